"""vit_adapter_seg.py against its spec (shared/papers/vit_adapter.md): every UperNet preset against the
config tables (sections 1.8, 5.1-5.4), table driven; the model's structure per preset (stochastic depth
of the ViT and of the extractors, norms, heads, injector gamma and layer-scale inits); the adapter's
forward around the interactions written out by hand (SPM tokens + level embeddings in; up-sampling, ViT
features and output norms out); injector and extractor against their formulas with stochastic depth
acting; the data pipelines each preset builds; the checkpoint position-embedding resize against timm.
The real presets are built on the meta device; the formulas run on the tiny synthetic model.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torchvision.ops import StochasticDepth

import vit_adapter_seg as V
from common.seg_data import TestTransform, TrainTransform
from common.vit import VisionTransformer, vit_checkpoint_filter
from tests.seg_layouts import write_layout

IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
HALF = ((127.5,) * 3, (127.5,) * 3)
# spec 1.8 sizes: (embed dim, depth, heads, deform heads, deform ratio, interaction indexes)
SIZE = {"tiny": (192, 12, 3, 6, 1.0, [[0, 2], [3, 5], [6, 8], [9, 11]]),
        "small": (384, 12, 6, 6, 1.0, [[0, 2], [3, 5], [6, 8], [9, 11]]),
        "base": (768, 12, 12, 12, 0.5, [[0, 2], [3, 5], [6, 8], [9, 11]]),
        "large": (1024, 24, 16, 16, 0.5, [[0, 5], [6, 11], [12, 17], [18, 23]])}
# spec 5.3 / 5.4: crop, img_scale, test scale, slide stride; 5.2: schedule (iterations, eval every)
ADE512 = dict(dataset="ade20k", crop=512, scale=(2048, 512), test_scale=(2048, 512), stride=341, iters=160_000,
              eval_interval=16_000)
# spec 5.2 per config: lr, weight decay, layer decay (0 = none), custom keys, normalisation; 1.8: drop path,
# gamma init, head channels, with_cp (L); 2.1: pre-training grid (AugReg-B/L 384); 5.2 fp16 note: fp32 training
SPEC = {
    "ade20k_deit_tiny": dict(backbone="vit", size="tiny", **ADE512, lr=1.2e-4, weight_decay=0.01, layer_decay=0.95,
                             custom_keys=False, norm=IMAGENET, drop_path=0.1, init_values=0.0, head_channels=512,
                             with_cp=False, pretrain_size=224, amp=False),
    "ade20k_deit_small": dict(backbone="vit", size="small", **ADE512, lr=6e-5, weight_decay=0.01, layer_decay=0.95,
                              custom_keys=False, norm=IMAGENET, drop_path=0.2, init_values=0.0, head_channels=512,
                              with_cp=False, pretrain_size=224, amp=False),
    "ade20k_deit_base": dict(backbone="vit", size="base", **ADE512, lr=6e-5, weight_decay=0.01, layer_decay=0.95,
                             custom_keys=False, norm=IMAGENET, drop_path=0.3, init_values=0.0, head_channels=512,
                             with_cp=False, pretrain_size=224, amp=False),
    "ade20k_augreg_tiny": dict(backbone="vit", size="tiny", **ADE512, lr=1.2e-4, weight_decay=0.01, layer_decay=0.95,
                               custom_keys=False, norm=IMAGENET, drop_path=0.1, init_values=0.0, head_channels=512,
                               with_cp=False, pretrain_size=224, amp=False),
    "ade20k_augreg_base": dict(backbone="vit", size="base", **ADE512, lr=2e-5, weight_decay=0.01, layer_decay=0.0,
                               custom_keys=True, norm=HALF, drop_path=0.3, init_values=0.0, head_channels=512,
                               with_cp=False, pretrain_size=384, amp=False),
    "ade20k_augreg_large": dict(backbone="vit", size="large", **ADE512, lr=2e-5, weight_decay=0.05, layer_decay=0.95,
                                custom_keys=False, norm=HALF, drop_path=0.4, init_values=0.0, head_channels=512,
                                with_cp=True, pretrain_size=384, amp=False),
}
# upernet_deit_adapter_light_base_512_160k_ade20k.py: DeiT-B's recipe, one interaction over the 12 blocks,
# no ConvFFN, no extra extractors, no ViT features added to the outputs
SPEC["ade20k_deit_light_base"] = dict(SPEC["ade20k_deit_base"], interaction_indexes=[[0, 11]], with_cffn=False,
                                      use_extra_extractor=False, add_vit_feature=False)
BEIT_L = dict(backbone="beit", size="large", lr=2e-5, weight_decay=0.05, layer_decay=0.90, custom_keys=False,
              norm=IMAGENET, drop_path=0.3, init_values=1e-6, head_channels=1024, with_cp=True, amp=False)
SPEC.update({
    "ade20k_beit_large": dict(BEIT_L, dataset="ade20k", crop=640, scale=(2048, 640), test_scale=(2048, 640), stride=426,
                              iters=160_000, eval_interval=16_000),
    "coco_stuff10k_beit_large": dict(BEIT_L, dataset="coco_stuff10k", crop=512, scale=(2048, 512),
                                     test_scale=(2048, 512), stride=341, iters=80_000, eval_interval=8000),
    "coco_stuff164k_beit_large": dict(BEIT_L, dataset="coco_stuff164k", crop=640, scale=(2560, 640),
                                      test_scale=(2560, 640), stride=426, iters=80_000, eval_interval=8000),
    "pascal_context59_beit_large": dict(BEIT_L, dataset="pascal_context59", crop=480, scale=(520, 520),
                                        test_scale=(4096, 520), stride=320, iters=80_000, eval_interval=8000),
})


def preset_args(name, *extra):
    return V.get_args(["--preset", name, "--summary", *extra])


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_are_the_released_configs(name):
    s, a = SPEC[name], preset_args(name)
    dim, depth, heads, dheads, ratio, idx = SIZE[s["size"]]
    got = {k: getattr(a, k) for k in s}
    got["scale"], got["test_scale"], got["norm"] = tuple(a.scale), tuple(a.test_scale), tuple(map(tuple, a.norm))
    assert got == s
    assert (a.embed_dim, a.depth, a.num_heads, a.deform_heads, a.deform_ratio, a.interaction_indexes) == \
           (dim, depth, heads, dheads, ratio, s.get("interaction_indexes", idx))
    light = name.endswith("light_base")
    assert (a.with_cffn, a.use_extra_extractor, a.add_vit_feature) == (not light,) * 3
    # shared (spec 1.8, 5.1, 5.4): 4 points, SPM 64, ConvFFN 0.25, warmup 1500, batch 16, slide inference
    assert (a.n_points, a.conv_inplane, a.cffn_ratio, a.warmup, a.batch_size, a.eval_mode) == \
           (4, 64, 0.25, 1500, 16, "slide")
    upernet = {k for k, p in V.PRESETS.items() if getattr(p, "head", "upernet") == "upernet"} - {"synthetic"}
    assert upernet == set(SPEC), "a preset without its row here: add the config's values from the spec"


def meta_model(name):
    a = preset_args(name)
    with torch.device("meta"):
        return a, V.build_model(a, 150)


@pytest.mark.parametrize("name", ["ade20k_deit_small", "ade20k_augreg_large", "ade20k_beit_large"])
def test_structure_of_the_presets(name):
    """ViT blocks: stochastic depth linspace(0, rate, depth), per sample ('row'); every extractor (and the
    extra two of the last interaction): the backbone's maximum rate, constant (spec 1.5, upstream #167);
    all LayerNorms eps 1e-6 (1.4, 2.1); UperNet channels (512 / BEiT-L 1024) on the four adapter maps,
    PPM (1, 2, 3, 6), FCN aux on the stride-16 map (256 channels) with weight 0.4 (4.1)."""
    a, model = meta_model(name)
    bb = model.backbone
    rates = [blk.drop_path.p if isinstance(blk.drop_path, StochasticDepth) else 0.0 for blk in bb.blocks]
    assert rates == pytest.approx([a.drop_path * i / (a.depth - 1) for i in range(a.depth)])
    assert all(blk.drop_path.mode == "row" for blk in bb.blocks[1:])
    extractors = [e for inter in bb.interactions for e in [inter.extractor] + list(inter.extra_extractors or [])]
    assert len(extractors) == 4 + 2 and bb.interactions[-1].extra_extractors is not None
    for e in extractors:
        assert isinstance(e.drop_path, StochasticDepth) and e.drop_path.p == a.drop_path and e.drop_path.mode == "row"
    assert all(m.eps == 1e-6 for m in bb.modules() if isinstance(m, nn.LayerNorm))
    head, aux = model.decode_head, model.auxiliary_head
    assert [c.conv.in_channels for c in head.lateral_convs] == [a.embed_dim] * 3
    assert head.conv_seg.in_channels == a.head_channels and [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]
    assert (aux.in_index, aux.convs[0].conv.in_channels, aux.conv_seg.in_channels, model.aux_weight) == \
           (2, a.embed_dim, 256, 0.4)


def tiny(*flags):
    return V.get_args(["--preset", "synthetic", *flags])


def test_injector_gamma_and_layer_scale_inits():
    """Injector gamma starts at init_values (ViT 0, BEiT 1e-6; spec 1.4), BEiT's layer scales too (2.2);
    the plain ViT's gamma1 / gamma2 start at 1 (2.1)."""
    model = V.build_model(tiny(), 6)
    for inter in model.backbone.interactions:
        assert torch.equal(inter.injector.gamma, torch.zeros(64))
    assert all(torch.equal(b.gamma1, torch.ones(64)) and torch.equal(b.gamma2, torch.ones(64))
               for b in model.backbone.blocks)
    a = tiny()
    a.backbone, a.init_values = "beit", 1e-6
    model = V.build_model(a, 6)
    for inter in model.backbone.interactions:
        assert torch.equal(inter.injector.gamma, torch.full((64,), 1e-6))
    assert all(torch.equal(b.gamma_1, torch.full((64,), 1e-6)) for b in model.backbone.blocks)


def bn_eval(bn, x):
    return (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]


def randomised_tiny_model():
    torch.manual_seed(0)
    model = V.build_model(tiny("--drop-path", "0"), 6).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for inter in model.backbone.interactions:
            inter.injector.gamma.normal_(generator=g)
        model.backbone.pos_embed.normal_(generator=g)
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(generator=g)
                m.bias.normal_(generator=g)
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(generator=g)
                m.bias.normal_(generator=g)
    return model


def test_adapter_forward_around_the_interactions_by_hand():
    """Spec 1.1. In: c = cat(c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]) of the SPM
    tokens, x = patch embedding + pos_embed (cls entry dropped) resized bicubically to the grid. Out:
    c1 = ConvTranspose(c2) + SPM c1; c1..c4 += the 4 interactions' ViT maps resized x4, x2, x1, x0.5
    (bilinear); then one BN per level."""
    model = randomised_tiny_model()
    bb = model.backbone
    seen, outs = {}, []
    bb.spm.register_forward_hook(lambda m, i, o: seen.update(spm=o))  # hooks return None: nothing altered
    bb.interactions[0].register_forward_pre_hook(lambda m, args: seen.update(inputs=args[:2]))
    for inter in bb.interactions:
        inter.register_forward_hook(lambda m, i, o: outs.append(o) and None)
    img = torch.randn(2, 3, 64, 96)  # ViT grid 4 x 6, SPM levels 8 x 12, 4 x 6, 2 x 3
    with torch.no_grad():
        feats = bb(img)
        s1, s2, s3, s4 = seen["spm"]
        x0, c0 = seen["inputs"]
        torch.testing.assert_close(c0, torch.cat([s2 + bb.level_embed[0], s3 + bb.level_embed[1],
                                                  s4 + bb.level_embed[2]], 1))
        patches = F.conv2d(img, bb.patch_embed.proj.weight, bb.patch_embed.proj.bias, stride=16)  # (B, D, 4, 6)
        pos = bb.pos_embed[0, 1:].T.reshape(1, 64, 4, 4)  # pre-training grid 64 / 16 = 4
        pos = F.interpolate(pos, size=(4, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(x0, (patches + pos).flatten(2).transpose(1, 2))

        vit = [o[0].transpose(1, 2).reshape(2, 64, 4, 6) for o in outs]  # each interaction's ViT tokens
        c = outs[-1][1]
        c2 = c[:, :96].transpose(1, 2).reshape(2, 64, 8, 12)
        c3 = c[:, 96:120].transpose(1, 2).reshape(2, 64, 4, 6)
        c4 = c[:, 120:].transpose(1, 2).reshape(2, 64, 2, 3)
        c1 = F.conv_transpose2d(c2, bb.up.weight, bb.up.bias, stride=2) + s1
        bil = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        ref = [c1 + bil(vit[0], (16, 24)), c2 + bil(vit[1], (8, 12)), c3 + vit[2], c4 + bil(vit[3], (2, 3))]
        ref = [bn_eval(n, r) for n, r in zip((bb.norm1, bb.norm2, bb.norm3, bb.norm4), ref)]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)


class ScriptedDropPath(nn.Module):
    """Sample 0's branch dropped, sample 1's kept and scaled 1 / 0.7 (DropPath in training, scripted)."""

    def forward(self, x):
        return x * torch.tensor([0.0, 1 / 0.7]).view(2, 1, 1)


def ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, eps=1e-6)


def test_injector_and_extractor_formulas_with_stochastic_depth():
    """Spec 1.4: x + gamma * MSDA(LN(x), 3 levels of LN(c)), no DropPath. Spec 1.5: c + MSDA(LN(c), LN(x)),
    then c + DropPath(ConvFFN(LN(c))), ConvFFN = fc2(GELU(DWConv(fc1(.)))) with one depth-wise 3x3 conv
    over the three levels (16n / 4n / n tokens)."""
    model = randomised_tiny_model()
    inter = model.backbone.interactions[1]
    inj, ext = inter.injector, inter.extractor
    ext.drop_path = ScriptedDropPath()
    (r1, sh1, st1), (r2, sh2, st2) = V.deform_inputs(64, 96, "cpu")
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 24, 64, generator=g), torch.randn(2, 96 + 24 + 6, 64, generator=g)
    with torch.no_grad():
        ref = x + inj.gamma * inj.attn(ln(inj.query_norm, x), r1, ln(inj.feat_norm, c), sh1, st1)
        torch.testing.assert_close(inj(x, c, r1, sh1, st1), ref)
        c_a = c + ext.attn(ln(ext.query_norm, c), r2, ln(ext.feat_norm, x), sh2, st2)
        h = F.linear(ln(ext.ffn_norm, c_a), ext.ffn.fc1.weight, ext.ffn.fc1.bias)  # (B, 126, 16)
        dw = ext.ffn.dwconv.dwconv
        levels = []
        for t, (hh, ww) in zip(h.split([96, 24, 6], 1), [(8, 12), (4, 6), (2, 3)]):
            m = t.transpose(1, 2).reshape(2, 16, hh, ww)
            levels.append(F.conv2d(m, dw.weight, dw.bias, padding=1, groups=16).flatten(2).transpose(1, 2))
        f = F.linear(F.gelu(torch.cat(levels, 1)), ext.ffn.fc2.weight, ext.ffn.fc2.bias)
        ref = c_a + torch.tensor([0.0, 1 / 0.7]).view(2, 1, 1) * f
        torch.testing.assert_close(ext(c, x, r2, sh2, st2, 4, 6), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# data pipelines and checkpoints

@pytest.mark.parametrize("name", ["ade20k_augreg_base", "ade20k_deit_tiny"])
def test_data_pipelines_of_the_presets(tmp_path, name):
    """Spec 5.3: random resize (0.5, 2) of img_scale, crop 0.75, flip, photometric, the preset's
    normalisation (AugReg-B/L 127.5), pad to the crop; 5.4: keep-ratio test resize, then up to a multiple of
    32 (single scale); --ms-flip rescales the original image itself."""
    root = write_layout("ade20k", tmp_path, n_train=1, n_val=1)
    s = SPEC[name]
    a = V.get_args(["--preset", name, "--data-root", root])
    train, val = V.build_data(a)
    tf, vf = train.transform, val.transform
    assert isinstance(tf, TrainTransform) and isinstance(vf, TestTransform)
    assert (tf.scale, tf.crop, tf.ratio_range, tf.cat_max_ratio, tf.flip_prob, tf.photometric) == \
           (s["scale"], (s["crop"],) * 2, (0.5, 2.0), 0.75, 0.5, True)
    assert (tuple(tf.mean), tuple(tf.std)) == s["norm"] == (tuple(vf.mean), tuple(vf.std))
    assert (vf.scale, vf.size_divisor) == (s["test_scale"], 32)
    a = V.get_args(["--preset", name, "--data-root", root, "--ms-flip"])
    _, val = V.build_data(a, with_train=False)
    assert (val.transform.scale, val.transform.size_divisor) == (None, None)


@pytest.mark.parametrize("src,dst,prefix", [(4, 6, 1), (6, 4, 1), (4, 6, 0)])
def test_checkpoint_pos_embed_resize_equals_timm(src, dst, prefix):
    """A checkpoint whose position grid differs from the model's pre-training grid is resized bicubically
    (align_corners=False, no antialiasing: mmcv's loader), as timm's resample_abs_pos_embed does; the cls
    entry is kept (or zero when the checkpoint has none, as an .npz without cls)."""
    model = VisionTransformer(img_size=16 * dst, embed_dim=8, depth=1, num_heads=2)
    pe = torch.randn(1, prefix + src * src, 8)
    out = vit_checkpoint_filter({"pos_embed": pe}, model)["pos_embed"]
    ref = resample_abs_pos_embed(pe, [dst, dst], num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
    if not prefix:
        ref = torch.cat([torch.zeros(1, 1, 8), ref], 1)
    assert out.shape == model.pos_embed.shape
    torch.testing.assert_close(out, ref)


def test_training_loop_follows_the_mmcv_schedule(tmp_path):
    """Spec 5.1: mmcv 1.x poly (power 1, min 0) over the whole run with the linear warmup (ratio 1e-6)
    multiplied on top, set every iteration; the logged lr is the largest group's (scale 1): 3 iterations of a
    4-iteration run, warmup 2."""
    import json
    from common.train import warmup_poly_mmcv
    wd = tmp_path / "run"
    V.main(["--preset", "synthetic", "--batch-size", "2", "--workers", "0", "--vis", "0", "--num-samples", "4",
            "--iters", "4", "--stop-at", "3", "--warmup", "2", "--log-interval", "1", "--lr", "1e-3",
            "--eval-interval", "100", "--work-dir", str(wd)])
    lrs = [r["lr"] for r in map(json.loads, open(wd / "log.jsonl")) if "lr" in r]
    assert lrs == pytest.approx([1e-3 * warmup_poly_mmcv(k, 4, 2) for k in range(3)])
    assert lrs == pytest.approx([1e-9, 1e-3 * 0.75 * (1 - 0.5 * (1 - 1e-6)), 1e-3 * 0.5])


def test_optimiser_is_adamw_with_layer_decay():
    """Spec 5.1: AdamW, betas (0.9, 0.999), eps 1e-8; each group's lr = lr x rate^(depth + 1 - layer id)."""
    a = tiny()
    model = V.build_model(a, 6)
    opt = V.build_optimizer(a, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert {(g["betas"], g["eps"], g["amsgrad"]) for g in opt.param_groups} == {((0.9, 0.999), 1e-8, False)}
    lr = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(a.lr * 0.95 ** a.depth)
    assert lr["backbone.spm.fc1.weight"] == pytest.approx(a.lr)
