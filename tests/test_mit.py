"""MiT (common/mit.py) and the DAFormer head (common/daformer.py).

MiT is compared with HF transformers' SegformerModel (a reference we did not write) after weight transfer;
parameter counts with the audit's exact figures; the checkpoint loader with tiny state dicts in every
supported layout (mmseg's checked against torch's nn.MultiheadAttention, which mmseg's MiT runs on);
the head with a hand computation from F.linear / F.conv2d / F.batch_norm.
"""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.daformer import DAFormerHead
from common.io import UserError
from common.mit import MIT_SIZES, Block, MixVisionTransformer, load_mit_pretrained, mit


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny_mit(**kw):
    """Four stages, every sr branch present (8, 4, 2, 1), several heads, two blocks in stage 2."""
    return MixVisionTransformer(**{**dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
                                          drop_path_rate=0.0), **kw})


def randomize_(model, seed):
    """Every parameter random (LayerNorm weights around 1), so biases and norms take part in comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.2 * r if "norm" in n and n.endswith("weight") else 0.1 * r)
    return model


# ----------------------------------------------------------------------------------------------------
# 1. equality with HF transformers' SegformerModel

def hf_to_ours(hsd):
    """HF SegformerModel names -> ours (NVlabs): separate k/v projections become our one kv Linear [k; v]."""
    rename = [("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.q_proj", "attn.q"),
              ("attention.o_proj", "attn.proj"), ("attention.sequence_reduction.sequence_reduction", "attn.sr"),
              ("attention.sequence_reduction.layer_norm", "attn.norm")]
    out = {}
    for k, v in hsd.items():
        s, rest = re.match(r"stages\.(\d)\.(.*)", k).groups()
        s = int(s) + 1
        if rest.startswith("patch_embeddings."):
            out[f"patch_embed{s}." + rest[len("patch_embeddings."):].replace("layer_norm", "norm")] = v
        elif rest.startswith("layer_norm."):
            out[f"norm{s}." + rest[len("layer_norm."):]] = v
        else:
            j, r = re.match(r"blocks\.(\d+)\.(.*)", rest).groups()
            if "v_proj" in r:
                continue
            if "k_proj" in r:
                out[f"block{s}.{j}.attn.kv.{r.split('.')[-1]}"] = torch.cat([v, hsd[k.replace("k_proj", "v_proj")]])
                continue
            for a, b in rename:
                r = r.replace(a, b)
            out[f"block{s}.{j}.{r}"] = v
    return out


def test_mit_matches_hf_segformer():
    import transformers   # requirements.txt pins it (test-only); a reference that silently skips tests nothing
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[32, 64, 160, 256], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, reshape_last_stage=True,
        attn_implementation="sdpa")   # HF's eager path runs softmax in float32 even for float64 inputs
    hf = randomize_(transformers.SegformerModel(cfg), 1).double().eval()
    ours = MixVisionTransformer(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), drop_path_rate=0.1)
    ours = ours.double().eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 70, 94, dtype=torch.float64)   # not a multiple of 32, not square

    def max_diffs():
        with torch.no_grad():
            ref = hf(x, output_hidden_states=True).hidden_states
            got = ours(x)
        assert [tuple(r.shape) for r in ref] == [(2, 32, 18, 24), (2, 64, 9, 12), (2, 160, 5, 6), (2, 256, 3, 3)]
        assert [r.shape for r in ref] == [g.shape for g in got]
        return [(g - r).abs().max().item() for g, r in zip(got, ref)]

    # HF builds every LayerNorm with PyTorch's default eps 1e-5; the official code (and ours) uses 1e-5 only in
    # the patch embeddings and the sr reduction, 1e-6 in the blocks and at the stage ends. The comparison
    # with HF as it is must therefore fail, which shows that float64 at 1e-10 sees an eps change ...
    assert max(max_diffs()) > 1e-8
    # ... and with HF's block and stage-end norms set to the official 1e-6 (in this test only), it matches.
    for name, m in hf.named_modules():
        if isinstance(m, nn.LayerNorm) and re.search(r"layernorm_(before|after)$|^stages\.\d\.layer_norm$", name):
            m.eps = 1e-6
    assert max(max_diffs()) < 1e-10


def test_layernorm_eps_and_init():
    """Official eps per norm (the HF comparison catches any change only together with this list), and the
    SegFormer init: Linear trunc-normal 0.02 / bias 0, LN 1 / 0, conv normal(0, sqrt(2 / fan_out))."""
    torch.manual_seed(0)
    model = mit("mit_b1", depths=(1, 1, 1, 1))
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    for n, e in eps.items():
        expected = 1e-5 if re.match(r"patch_embed\d\.norm$|block\d\.\d+\.attn\.norm$", n) else 1e-6
        assert e == expected, n
    assert sum(1 for n in eps if n.endswith("attn.norm")) == 3 and "norm4" in eps
    sd = model.state_dict()
    assert abs(sd["block3.0.mlp.fc1.weight"].std().item() - 0.02) < 0.001
    assert sd["block3.0.attn.kv.bias"].abs().max() == 0 and sd["block3.0.attn.q.bias"].abs().max() == 0
    for key, fan_out in [("patch_embed1.proj.weight", 7 * 7 * 64), ("patch_embed4.proj.weight", 3 * 3 * 512),
                         ("block1.0.attn.sr.weight", 8 * 8 * 64), ("block3.0.mlp.dwconv.dwconv.weight", 9)]:
        assert abs(sd[key].std().item() / math.sqrt(2 / fan_out) - 1) < 0.08, key
        assert sd[key.replace("weight", "bias")].abs().max() == 0
    assert (sd["norm2.weight"] == 1).all() and (sd["block2.0.norm1.bias"] == 0).all()


# ----------------------------------------------------------------------------------------------------
# 2. parameter counts (audit C.1-C.2), on the meta device

def formula_params(embed_dims, depths, sr_ratios, **_):
    """Audit C.1: block 12C^2 + 53C (+ r^2 C^2 + 3C with sr), patch embed k^2 Cin C + 3C, stage norm 2C."""
    total, cin = 0, 3
    for i, (c, d, r) in enumerate(zip(embed_dims, depths, sr_ratios)):
        k = 7 if i == 0 else 3
        block = 12 * c * c + 53 * c + (r * r * c * c + 3 * c if r > 1 else 0)
        total += k * k * cin * c + 3 * c + d * block + 2 * c
        cin = c
    return total


def test_parameter_counts():
    with torch.device("meta"):
        b5 = mit("mit_b5")
        heads = [DAFormerHead(), DAFormerHead(in_channels=(128, 256, 512, 1024))]
        sizes = {name: n_params(mit(name)) for name in MIT_SIZES}
    assert n_params(b5) == 81_443_008 and len(b5.state_dict()) == 1052
    for name, n in sizes.items():
        assert n == formula_params(**MIT_SIZES[name]), name
    assert sizes["mit_b0"] < sizes["mit_b1"] < sizes["mit_b2"] < sizes["mit_b3"] < sizes["mit_b4"] < sizes["mit_b5"]
    assert [n_params(h) for h in heads] == [3_712_275, 3_941_651]
    assert len(heads[0].state_dict()) == 58
    assert n_params(b5) + n_params(heads[0]) == 85_155_283


# ----------------------------------------------------------------------------------------------------
# 3. stochastic depth

def test_drop_path_rates_and_rescaling():
    model = tiny_mit(depths=(2, 3, 1, 2), drop_path_rate=0.35)
    blocks = [b for i in range(4) for b in model.stage(i)[1]]
    rates = [getattr(b.drop_path, "p", 0.0) for b in blocks]
    assert rates == pytest.approx([0.35 * i / 7 for i in range(8)], abs=1e-7)
    assert isinstance(blocks[0].drop_path, nn.Identity)

    # one block in train mode: each sample's output is x + m1 * a / keep, then + m2 * f / keep, with the masks
    # m1, m2 in {0, 1} per sample; every sample must match one of the four, and both 0 and 1 must occur
    torch.manual_seed(0)
    blk = Block(8, 2, drop_path=0.5, sr_ratio=2).train()
    keep = 0.5
    x = torch.randn(32, 6 * 4, 8)
    with torch.no_grad():
        out = blk(x, 6, 4)
        hits = []
        for b in range(32):
            xb = x[b:b + 1]
            a = blk.attn(blk.norm1(xb), 6, 4)
            cands = {}
            for m1 in (0, 1):
                y = xb + m1 * a / keep
                f = blk.mlp(blk.norm2(y), 6, 4)
                for m2 in (0, 1):
                    cands[(m1, m2)] = y + m2 * f / keep
            match = [k for k, c in cands.items() if torch.allclose(out[b:b + 1], c, atol=1e-5)]
            assert len(match) == 1, b
            hits.append(match[0])
    assert {h[0] for h in hits} == {0, 1} and {h[1] for h in hits} == {0, 1}
    blk.eval()
    with torch.no_grad():   # eval: no dropping, no rescaling
        y = x + blk.attn(blk.norm1(x), 6, 4)
        assert torch.allclose(blk(x, 6, 4), y + blk.mlp(blk.norm2(y), 6, 4), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 4. checkpoint loading

def to_mmseg(sd):
    """Our (NVlabs) keys -> mmseg's converted layout (facts of mmseg tools/model_converters/mit2mmseg.py)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(patch_embed|norm|block)(\d)\.(.*)", k)
        kind, i, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
        if kind == "patch_embed":
            out[f"layers.{i}.0.{rest.replace('proj.', 'projection.')}"] = v
        elif kind == "norm":
            out[f"layers.{i}.2.{rest}"] = v
        else:
            j, r = rest.split(".", 1)
            pre = f"layers.{i}.1.{j}."
            if r.startswith("attn.kv."):
                continue
            if r.startswith("attn.q."):
                t = r.split(".")[-1]
                out[pre + f"attn.attn.in_proj_{t}"] = torch.cat([v, sd[k.replace("attn.q.", "attn.kv.")]])
                continue
            r = r.replace("attn.proj.", "attn.attn.out_proj.")
            r = r.replace("mlp.fc1.", "ffn.layers.0.").replace("mlp.dwconv.dwconv.", "ffn.layers.1.")
            r = r.replace("mlp.fc2.", "ffn.layers.4.")
            if r in ("ffn.layers.0.weight", "ffn.layers.4.weight"):
                v = v[:, :, None, None]   # Linear -> 1x1 conv
            out[pre + r] = v
    return out


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_same_outputs(a, b, x):
    for u, v in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(u, v)


def test_load_every_layout(tmp_path, capsys):
    src, other = randomize_(tiny_mit(), 1), randomize_(tiny_mit(), 2)
    sd, osd = src.state_dict(), other.state_dict()
    x = torch.randn(1, 3, 40, 56)
    head = {"decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1), "decode_head.conv_seg.bias": torch.zeros(3)}

    nvlabs = {**sd, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    torch.save({"state_dict": nvlabs}, tmp_path / "mit_tiny.pth")
    model = tiny_mit()
    info = load_mit_pretrained(model, tmp_path / "mit_tiny.pth")
    assert info["layout"] == "nvlabs" and sorted(info["dropped"]) == ["head.bias", "head.weight"]
    line = capsys.readouterr().out.strip()
    assert "mit_tiny.pth" in line and "head.*" in line and len(line.splitlines()) == 1
    assert_same_outputs(model, src, x)

    mm = to_mmseg(sd)
    assert "layers.0.1.0.attn.attn.in_proj_weight" in mm and mm["layers.1.1.1.ffn.layers.4.weight"].ndim == 4
    layouts = {
        "mmseg": mm,
        "mmseg segmentor": {"meta": {"iter": 4}, "state_dict": {**{"backbone." + k: v for k, v in mm.items()},
                                                                **head}},
        "segmentor (DAFormer, Uni-UVPT)": {"state_dict": {**{"backbone." + k: v for k, v in sd.items()}, **head}},
        "ATP student + teacher": {**{"ema_model.backbone." + k: v for k, v in osd.items()},
                                  **{"model.backbone." + k: v for k, v in sd.items()},
                                  **{"model." + k: v for k, v in head.items()}},
        "model wrapper": {"model": {"backbone." + k: v for k, v in sd.items()}},
    }
    for name, ck in layouts.items():
        model = tiny_mit()
        info = load_mit_pretrained(model, ck, verbose=False)
        assert info["layout"] == ("mmseg" if "mmseg" in name else "nvlabs"), name
        assert_same_outputs(model, src, x)
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
        if name.startswith("ATP"):   # the teacher and the heads are reported, not loaded
            assert len(info["dropped"]) == len(osd) + 2 and "ema_model.backbone.norm4.bias" in info["dropped"]
    model = tiny_mit()   # a teacher-only ATP file loads the teacher
    load_mit_pretrained(model, {"ema_model.backbone." + k: v for k, v in osd.items()}, verbose=False)
    assert_same_outputs(model, other, x)


def test_mmseg_layout_means_what_mmseg_computes():
    """mmseg's MiT runs attention with torch's nn.MultiheadAttention on in_proj = [q; k; v] and its FFN as
    1x1 / 3x3 / 1x1 convs: loading its tensors must give our attention and Mix-FFN those functions."""
    src = randomize_(tiny_mit(), 3)
    mm = to_mmseg(src.state_dict())
    model = tiny_mit()
    load_mit_pretrained(model, mm, verbose=False)
    blk, c, h, w = model.block2[1], 16, 5, 7
    x = torch.randn(2, h * w, c)
    p = "layers.1.1.1."
    mha = nn.MultiheadAttention(c, 2, batch_first=True)
    mha.load_state_dict({"in_proj_weight": mm[p + "attn.attn.in_proj_weight"],
                         "in_proj_bias": mm[p + "attn.attn.in_proj_bias"],
                         "out_proj.weight": mm[p + "attn.attn.out_proj.weight"],
                         "out_proj.bias": mm[p + "attn.attn.out_proj.bias"]})
    with torch.no_grad():
        kv = F.conv2d(x.transpose(1, 2).reshape(2, c, h, w), mm[p + "attn.sr.weight"], mm[p + "attn.sr.bias"],
                      stride=4).flatten(2).transpose(1, 2)
        kv = F.layer_norm(kv, (c,), mm[p + "attn.norm.weight"], mm[p + "attn.norm.bias"], eps=1e-5)
        assert torch.allclose(blk.attn(x, h, w), mha(x, kv, kv, need_weights=False)[0], atol=1e-5)
        y = x.transpose(1, 2).reshape(2, c, h, w)
        y = F.conv2d(y, mm[p + "ffn.layers.0.weight"], mm[p + "ffn.layers.0.bias"])
        y = F.gelu(F.conv2d(y, mm[p + "ffn.layers.1.weight"], mm[p + "ffn.layers.1.bias"], padding=1, groups=4 * c))
        y = F.conv2d(y, mm[p + "ffn.layers.4.weight"], mm[p + "ffn.layers.4.bias"]).flatten(2).transpose(1, 2)
        assert torch.allclose(blk.mlp(x, h, w), y, atol=1e-5)


def test_load_refuses_other_checkpoints(tmp_path):
    from common.swin import SwinTransformer
    swin = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    torch.save({"state_dict": swin.state_dict()}, tmp_path / "swin_tiny.pth")
    with pytest.raises(UserError, match=r"swin_tiny\.pth.*not a MiT"):
        load_mit_pretrained(tiny_mit(), tmp_path / "swin_tiny.pth")

    torch.save(tiny_mit(embed_dims=(8, 16, 24, 40)).state_dict(), tmp_path / "mit_other.pth")
    shape_msg = r"(?s)mit_other\.pth does not fit.*mis-shaped.*patch_embed4\.proj\.weight: checkpoint \(40, 24"
    with pytest.raises(UserError, match=shape_msg):
        load_mit_pretrained(tiny_mit(), tmp_path / "mit_other.pth")

    sd = tiny_mit().state_dict()
    del sd["block2.1.attn.kv.weight"]
    torch.save(sd, tmp_path / "mit_cut.pth")
    with pytest.raises(UserError, match=r"(?s)mit_cut\.pth.*missing.*block2\.1\.attn\.kv\.weight"):
        load_mit_pretrained(tiny_mit(), tmp_path / "mit_cut.pth")

    with pytest.raises(UserError, match="not found"):
        load_mit_pretrained(tiny_mit(), tmp_path / "absent.pth")
    with pytest.raises(UserError, match="mit_b9"):
        mit("mit_b9")


# ----------------------------------------------------------------------------------------------------
# 5. DAFormer head

def test_daformer_head_matches_hand_computation():
    torch.manual_seed(0)
    dil = (1, 2, 3, 4)
    head = DAFormerHead(in_channels=(4, 8, 12, 16), num_classes=5, embed_dim=8, channels=6, dilations=dil)
    with torch.no_grad():   # BN statistics and affine parameters away from identity, biases away from 0
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.5)
        head.conv_seg.bias.normal_()
    head.eval()
    feats = [torch.randn(2, c, *s) for c, s in zip((4, 8, 12, 16), [(9, 11), (5, 6), (3, 3), (2, 2)])]
    sd = head.state_dict()

    def cbr(x, p, **kw):   # conv (no bias) + BN (eval) + ReLU, from the state dict
        y = F.conv2d(x, sd[p + "conv.weight"], **kw)
        y = F.batch_norm(y, sd[p + "bn.running_mean"], sd[p + "bn.running_var"], sd[p + "bn.weight"],
                         sd[p + "bn.bias"], training=False, eps=1e-5)
        return F.relu(y)

    emb = []
    for i, f in enumerate(feats):
        t = F.linear(f.flatten(2).transpose(1, 2), sd[f"embed_layers.{i}.proj.weight"],
                     sd[f"embed_layers.{i}.proj.bias"])
        t = t.transpose(1, 2).reshape(2, 8, *f.shape[2:])
        emb.append(F.interpolate(t, size=(9, 11), mode="bilinear", align_corners=False))
    x = torch.cat(emb, 1)                                              # (2, 32, 9, 11)
    branches = [cbr(x, "fuse_layer.aspp_modules.0.")]
    for b, d in enumerate(dil[1:], 1):
        p = f"fuse_layer.aspp_modules.{b}."
        y = cbr(x, p + "depthwise_conv.", padding=d, dilation=d, groups=32)
        branches.append(cbr(y, p + "pointwise_conv."))
    y = cbr(torch.cat(branches, 1), "fuse_layer.bottleneck.", padding=1)
    expected = F.conv2d(y, sd["conv_seg.weight"], sd["conv_seg.bias"])
    with torch.no_grad():
        out = head(feats)
    assert out.shape == (2, 5, 9, 11)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (torch.cat(branches, 1) == 0).float().mean() > 0.1     # ReLUs do cut

    # training: Dropout2d(0.1) before conv_seg zeroes whole channels and scales the others by 1 / 0.9
    head.dropout.train()
    seen = []
    head.conv_seg.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        head(feats)
    z = seen[0]
    dropped = (z == 0).flatten(2).all(-1)                            # (B, channels)
    assert head.dropout.p == 0.1 and isinstance(head.dropout, nn.Dropout2d)
    assert torch.allclose(z[~dropped], y[~dropped] / 0.9, atol=1e-5)


def test_daformer_head_init_and_official_keys():
    torch.manual_seed(0)
    head = DAFormerHead()
    sd = head.state_dict()
    assert abs(sd["conv_seg.weight"].std().item() - 0.01) < 0.0005 and (sd["conv_seg.bias"] == 0).all()
    for name, m in head.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv_seg":
            assert m.bias is None, name
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]   # kaiming fan_out, groups ignored
            assert abs(m.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.05, name
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all(), name
    conv = {n: m for n, m in head.named_modules() if isinstance(m, nn.Conv2d)}
    for b, d in zip((1, 2, 3), (6, 12, 18)):
        dw = conv[f"fuse_layer.aspp_modules.{b}.depthwise_conv.conv"]
        assert dw.dilation == (d, d) and dw.padding == (d, d) and dw.groups == 1024
    assert conv["fuse_layer.bottleneck.conv"].padding == (1, 1)

    # audit C.3 key list with its shapes, as in a DAFormer / Uni-UVPT / ATP checkpoint
    def bn(p, c):
        return {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,), p + "running_var": (c,),
                p + "num_batches_tracked": ()}
    shapes = {}
    for i, c in enumerate((64, 128, 320, 512)):
        shapes.update({f"embed_layers.{i}.proj.weight": (256, c), f"embed_layers.{i}.proj.bias": (256,)})
    shapes["fuse_layer.aspp_modules.0.conv.weight"] = (256, 1024, 1, 1)
    shapes.update(bn("fuse_layer.aspp_modules.0.bn.", 256))
    for b in (1, 2, 3):
        p = f"fuse_layer.aspp_modules.{b}."
        shapes[p + "depthwise_conv.conv.weight"] = (1024, 1, 3, 3)
        shapes.update(bn(p + "depthwise_conv.bn.", 1024))
        shapes[p + "pointwise_conv.conv.weight"] = (256, 1024, 1, 1)
        shapes.update(bn(p + "pointwise_conv.bn.", 256))
    shapes["fuse_layer.bottleneck.conv.weight"] = (256, 1024, 3, 3)
    shapes.update(bn("fuse_layer.bottleneck.bn.", 256))
    shapes.update({"conv_seg.weight": (19, 256, 1, 1), "conv_seg.bias": (19,)})
    ck = {k: (torch.zeros(s, dtype=torch.long) if k.endswith("tracked") else torch.randn(s))
          for k, s in shapes.items()}
    result = head.load_state_dict(ck, strict=True)
    assert not result.missing_keys and not result.unexpected_keys and len(ck) == 58
