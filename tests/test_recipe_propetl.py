"""propetl.py against its spec (shared/papers/propetl.md): every value of the released configs, table
driven (sections 2.5, 2.6, 3.3, 3.4, 4.1, 5); the data pipelines the script builds; the model's wiring
(drop-path schedule, heads, loss weights, optimiser groups); the midstream head and both adapter blocks
against their formulas with stochastic depth acting; the official midstream checkpoint's key layout.
Swin-L is built on the meta device (structure only); the formulas run on a tiny Swin.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import propetl as P
from common.io import atomic_save
from common.seg_data import TestTransform, TrainTransform
from common.train import param_groups
from tests.seg_layouts import write_layout

TINY = ["--dataset", "synthetic", "--embed-dim", "16", "--depths", "1", "1", "2", "1", "--num-heads", "1", "2", "2",
        "4", "--head-channels", "32", "--reduction", "4", "--batch-size", "4", "--workers", "0", "--num-samples", "8",
        "--vis", "0"]

# spec 2.5 / 2.6 (midstream) and 3.4 / 5 (downstream); crop and pad (h, w); ADE20K downstream trains 512
# crops padded to 640 (spec 7.1); test resize (2048, 512) keep-ratio everywhere (3.5)
SPEC = {
    ("voc", "mid"): dict(iters=20_000, warmup=250, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640, pad=640,
                         r=24),
    ("voc", "down"): dict(iters=40_000, warmup=500, lr=1e-4, weight_decay=0.01, scale=(2048, 512), crop=640, pad=640,
                          r=24),
    ("ade20k", "mid"): dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2560, 640), crop=640, pad=640,
                            r=24),
    ("ade20k", "down"): dict(iters=160_000, warmup=1500, lr=3e-4, weight_decay=0.02, scale=(2048, 512), crop=512,
                             pad=640, r=24),
    ("coco_stuff10k", "mid"): dict(iters=40_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640,
                                   pad=640, r=48),
    ("coco_stuff10k", "down"): dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640,
                                    pad=640, r=48),
}
# the full fine-tuning baseline: mmseg's UperNet + Swin recipe on the downstream schedule (script docstring)
FULL = dict(lr=6e-5, weight_decay=0.01, warmup=1500)


def args_for(stage, dataset, *extra):
    return P.get_args(["--stage", stage, "--dataset", dataset, "--summary", *extra])


@pytest.mark.parametrize("dataset,stage", sorted(SPEC) + [("voc_aug", "mid"), ("voc_aug", "down")])
def test_presets_are_the_released_configs(dataset, stage):
    s = SPEC[("voc" if dataset == "voc_aug" else dataset, stage)]
    a = args_for(stage, dataset)
    got = dict(iters=a.iters, warmup=a.warmup, lr=a.lr, weight_decay=a.weight_decay, scale=tuple(a.scale),
               crop=a.crop, pad=a.pad, r=a.reduction)
    assert got == {**s, "crop": (s["crop"],) * 2, "pad": (s["pad"],) * 2}
    assert tuple(a.test_scale) == (2048, 512) and a.eval_mode == "whole"
    # spec 3.3 / 3.4 / 4.1: batch 16, Swin-L window 7, drop path 0.3, UperNet 512 channels, eval every 1k
    assert (a.batch_size, a.swin, a.window_size, a.drop_path, a.head_channels, a.eval_interval) == \
           (16, "large", 7, 0.3, 512, 1000)


@pytest.mark.parametrize("dataset", ["voc", "ade20k", "coco_stuff10k"])
def test_full_fine_tuning_recipe(dataset):
    a, down = args_for("full", dataset), SPEC[(dataset, "down")]
    assert (a.lr, a.weight_decay, a.warmup) == (FULL["lr"], FULL["weight_decay"], FULL["warmup"])
    assert (a.iters, tuple(a.scale), a.crop) == (down["iters"], down["scale"], (down["crop"],) * 2)


def test_cityscapes_preset_is_mmseg_cityscapes_recipe():
    a = args_for("down", "cityscapes")
    assert (a.crop, a.pad, tuple(a.scale), tuple(a.test_scale)) == \
           ((512, 1024), (512, 1024), (2048, 1024), (2048, 1024))
    assert a.iters == 80_000


def test_optimiser_keys_and_classes():
    assert P.NO_DECAY == ("absolute_pos_embed", "relative_position_bias_table", "norm")
    assert {k: P.DATASETS[k]["num_classes"] for k in ("voc", "ade20k", "coco_stuff10k", "cityscapes")} == \
           {"voc": 21, "ade20k": 150, "coco_stuff10k": 171, "cityscapes": 19}


def meta_model(stage, dataset="voc"):
    a = args_for(stage, dataset)
    with torch.device("meta"):
        return P.build_model(a, P.DATASETS[dataset]["num_classes"])


def test_swin_l_structure_and_heads():
    """Spec 3.3 and 4.1: Swin-L, window 7 with shift 3 on odd blocks, drop path linspace(0, 0.3, 24) over the
    blocks, LN eps 1e-5; adapters C // r; UperNet 512 channels on PPM (1, 2, 3, 6); FCN aux on stage 3
    (768 -> 256, one conv) with weight 0.4."""
    model = meta_model("down")
    blocks = [b for layer in model.backbone.layers for b in layer.blocks]
    assert len(blocks) == 24
    rates = [getattr(b.drop_path, "p", 0.0) for b in blocks]
    assert rates == pytest.approx([0.3 * i / 23 for i in range(24)])
    assert [b.shift_size for b in blocks[:4]] == [0, 3, 0, 3] and all(b.window_size == 7 for b in blocks)
    assert [b.adaptmlp.down_proj.out_features for b in (blocks[0], blocks[2], blocks[4], blocks[22])] == [8, 16, 32, 64]
    assert [b.adaptmlp_train.down_proj.out_features for b in (blocks[0], blocks[22])] == [16, 128]
    assert all(m.eps == 1e-5 for m in model.backbone.modules() if isinstance(m, nn.LayerNorm))
    head, aux = model.decode_head, model.auxiliary_head
    assert head.conv_seg.in_channels == 512 and len(head.psp_modules) == 4
    assert [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]
    assert [c.conv.in_channels for c in head.lateral_convs] == [192, 384, 768]
    assert aux.in_index == 2 and len(aux.convs) == 1 and aux.convs[0].conv.in_channels == 768
    assert aux.conv_seg.in_channels == 256 and model.aux_weight == 0.4
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1 and aux.dropout.p == 0.1


def test_weight_decay_groups_of_full_fine_tuning():
    """Spec 3.4 / 7.11: decay_mult 0 for names containing absolute_pos_embed / relative_position_bias_table /
    norm (mmengine substring match); the heads' BN ('bn') and every bias keep the weight decay."""
    a = args_for("full", "ade20k", "--embed-dim", "16", "--depths", "1", "1", "2", "1", "--num-heads", "1", "2", "2",
                 "4", "--head-channels", "32")
    model = P.build_model(a, 150)
    where = {n: g["weight_decay"] for g in param_groups(model, a.weight_decay, P.NO_DECAY) for n in g["names"]}
    for n in ("backbone.layers.0.blocks.0.norm1.weight", "backbone.norm3.bias", "backbone.patch_embed.norm.weight",
              "backbone.layers.2.blocks.1.attn.relative_position_bias_table",
              "backbone.layers.1.downsample.norm.weight"):
        assert where[n] == 0.0, n
    for n in ("decode_head.bottleneck.bn.weight", "auxiliary_head.convs.0.bn.bias", "decode_head.conv_seg.bias",
              "backbone.layers.0.blocks.0.attn.qkv.bias", "backbone.layers.0.blocks.0.mlp.fc1.weight"):
        assert where[n] == a.weight_decay == 0.01, n
    assert len(where) == sum(1 for _ in model.parameters())


def test_data_pipelines_of_the_presets(tmp_path):
    """Spec 5: RandomResize (0.5, 2.0) of the preset scale, crop with cat_max_ratio 0.75, flip, photometric,
    ImageNet RGB normalisation; test keep-ratio resize to (2048, 512), no multiple-of-32."""
    for dataset, stage in (("ade20k", "mid"), ("ade20k", "down"), ("voc", "down")):
        root = write_layout(dataset, tmp_path / f"{dataset}_{stage}", n_train=1, n_val=1)
        a = P.get_args(["--stage", stage, "--dataset", dataset, "--data-root", root])
        train, val = P.build_data(a)
        s, tf, vf = SPEC[(dataset, stage)], train.transform, val.transform
        assert isinstance(tf, TrainTransform) and isinstance(vf, TestTransform)
        assert (tf.scale, tf.crop, tf.ratio_range, tf.cat_max_ratio, tf.flip_prob, tf.photometric) == \
               (s["scale"], (s["crop"],) * 2, (0.5, 2.0), 0.75, 0.5, True)
        assert (tuple(tf.mean), tuple(tf.std)) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
        assert (vf.scale, vf.size_divisor, tuple(vf.mean), tuple(vf.std)) == \
               ((2048, 512), None, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


# ----------------------------------------------------------------------------------------------------
# the midstream head and the two blocks, by hand

def test_midstream_head_reads_raw_stage4_tokens():
    """Spec 2.3: mean of the RAW stage-4 tokens (no out-norm) -> Linear(C, C) -> Linear(C, K), no activation."""
    torch.manual_seed(0)
    model = P.build_model(P.get_args(["--stage", "mid", *TINY]), 6).eval()
    with torch.no_grad():
        for n in ("weight", "bias"):  # an out-norm that is not the identity: it must not matter
            getattr(model.backbone.norm3, n).normal_()
    seen = {}
    model.backbone.layers[3].register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o))
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = model(img)
        t = seen["tokens"]  # (B, L, C) leaving the last stage
        assert t.shape == (2, 4, 128)
        pooled = t.mean(1)
        ref = pooled @ model.final_proj.weight.T + model.final_proj.bias
        ref = ref @ model.final_proj_cls.weight.T + model.final_proj_cls.bias
    torch.testing.assert_close(z, ref)


class ScriptedDropPath(nn.Module):
    """Stands in for DropPath in training: sample 0's branch dropped, sample 1's kept and scaled by 1 / 0.7.
    Counts its calls (the block must apply it exactly to the attention and the MLP branches)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * torch.tensor([0.0, 1 / 0.7]).view(2, 1, 1)


def adapter(ad, x):
    """AdaptFormer adapter in eval: 0.1 * up(relu(down(x)))."""
    h = F.relu(F.linear(x, ad.down_proj.weight, ad.down_proj.bias))
    return 0.1 * F.linear(h, ad.up_proj.weight, ad.up_proj.bias)


@pytest.mark.parametrize("kind", ["mid", "two_concat"])
def test_adapter_blocks_with_stochastic_depth(kind):
    """Spec 2.2 / 3.1 with DropPath acting: x_a = x + DP(attn), a = A_mid(x_a), x_f = x_a + DP(mlp);
    mid: out = x_f + a (the adapter bypasses DropPath); two_concat: out = x_f + A_new(cat(x_f, x_f + a))."""
    torch.manual_seed(1)
    cls = P.MidBlock if kind == "mid" else P.TwoConcatBlock
    blk = cls(32, 2, window_size=4, shift_size=2, r=4, drop_path=0.3)
    for p in blk.parameters():
        nn.init.normal_(p, std=0.2)
    blk.eval()  # the adapters' dropout off; stochastic depth is scripted
    blk.drop_path = dp = ScriptedDropPath()
    x, hw = torch.randn(2, 6 * 5, 32), (6, 5)
    m = torch.tensor([0.0, 1 / 0.7]).view(2, 1, 1)
    with torch.no_grad():
        x_a = x + m * blk.window_msa(blk.norm1(x), hw)
        a = adapter(blk.adaptmlp, x_a)
        x_f = x_a + m * blk.mlp(blk.norm2(x_a))
        ref = x_f + a if kind == "mid" else x_f + adapter(blk.adaptmlp_train, torch.cat([x_f, x_f + a], -1))
        dp.calls = 0
        out = blk(x, hw)
    torch.testing.assert_close(out, ref)
    assert dp.calls == 2


# ----------------------------------------------------------------------------------------------------
# the official midstream checkpoint

def test_mid_checkpoint_in_the_official_layout(tmp_path):
    """The official midstream run is an mmseg checkpoint: {'meta', 'state_dict'} with the mmseg Swin names
    (backbone.stages.i.blocks.j..., w_msa, ffn.layers) and the head inside the backbone (final_proj*).
    Only the adapters are taken, into layers.i.blocks.j.adaptmlp; our own last.pt loads the same way."""
    a = P.get_args(["--stage", "down", *TINY])
    model = P.build_model(a, 6)
    g = torch.Generator().manual_seed(0)
    sd, expect = {}, {}
    for i, depth in enumerate((1, 1, 2, 1)):
        c = 16 * 2 ** i
        for j in range(depth):
            pre = f"backbone.stages.{i}.blocks.{j}."
            for name, shape in (("down_proj.weight", (c // 4, c)), ("down_proj.bias", (c // 4,)),
                                ("up_proj.weight", (c, c // 4)), ("up_proj.bias", (c,))):
                sd[pre + "adaptmlp." + name] = expect[f"layers.{i}.blocks.{j}.adaptmlp.{name}"] = \
                    torch.randn(shape, generator=g)
            sd[pre + "attn.w_msa.qkv.weight"] = torch.randn(3 * c, c, generator=g)
            sd[pre + "ffn.layers.0.0.weight"] = torch.randn(4 * c, c, generator=g)
    sd["backbone.patch_embed.projection.weight"] = torch.randn(16, 3, 4, 4, generator=g)
    sd["backbone.final_proj.weight"], sd["backbone.final_proj_cls.weight"] = torch.randn(128, 128), torch.randn(21, 128)
    path = tmp_path / "iter_20000.pth"
    atomic_save({"meta": {"iter": 20000, "mmseg_version": "1.1.0"}, "state_dict": sd}, path)
    a.mid_checkpoint = str(path)
    P.load_weights(a, model)
    own = model.backbone.state_dict()
    for k, v in expect.items():
        assert torch.equal(own[k], v), k
    # our own midstream last.pt: {'model': ...} with backbone.layers.* keys
    ours = {"backbone." + k: v + 1 for k, v in expect.items()}
    atomic_save({"model": ours, "iter": 3}, tmp_path / "last.pt")
    a.mid_checkpoint = str(tmp_path / "last.pt")
    P.load_weights(a, model)
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v + 1) for k, v in expect.items())


def test_training_loop_follows_the_mmengine_schedule(tmp_path):
    """Spec 2.5 / 3.4: mmengine LinearLR(1e-6, warmup) then PolyLR(power 1) to the last iteration, set every
    iteration (the logged lr of iteration k, 0-based, is lr x warmup_poly(k)): 3 iterations of a 4-iteration
    midstream run, warmup 2."""
    import json
    from common.train import warmup_poly
    wd = tmp_path / "mid"
    P.main(["--stage", "mid", *TINY, "--iters", "4", "--stop-at", "3", "--warmup", "2", "--log-interval", "1",
            "--lr", "1e-3", "--work-dir", str(wd)])
    lrs = [r["lr"] for r in map(json.loads, open(wd / "log.jsonl")) if "lr" in r]
    assert lrs == pytest.approx([1e-3 * warmup_poly(k, 4, 2) for k in range(3)])
    # mmengine: LinearLR over W=2 iterations has total_iters = end - begin - 1 = 1, so it reaches 1.0 at
    # iteration W-1 = 1; PolyLR(begin 2, end 4) then gives 1.0 at 2 and 0 at the last iteration 3
    assert lrs == pytest.approx([1e-9, 1e-3, 1e-3])


class Stop(Exception):
    pass


def test_optimiser_is_adamw_of_the_configs(tmp_path, monkeypatch):
    """Spec 2.5 / 3.4: AdamW, betas (0.9, 0.999), eps 1e-8, the preset's lr and weight decay on every
    trainable tensor of the midstream (none is a norm): run() stopped where the optimiser gets its lr."""
    seen = {}

    def capture(optimizer, lr):
        seen.update(optimizer=optimizer, lr=lr)
        raise Stop

    monkeypatch.setattr(P, "init_lr", capture)
    with pytest.raises(Stop):
        P.main(["--stage", "mid", *TINY, "--lr", "6e-5", "--weight-decay", "0.01", "--work-dir", str(tmp_path)])
    opt = seen["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and seen["lr"] == 6e-5
    assert {(g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) for g in opt.param_groups} == \
           {((0.9, 0.999), 1e-8, 0.01, False)}
