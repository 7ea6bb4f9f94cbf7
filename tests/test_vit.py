"""common/vit.py against timm (DeiT / AugReg ViT, BEiT) after weight transfer, its checkpoint loaders
(DeiT / timm .pth, JAX .npz through timm's own reader, BEiT .pth with shared or per-block tables), and the
SciPy-free relative-position resize against analytic functions (and SciPy, where it is installed)."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from common.io import UserError
from common.vit import (beit, cubic_spline_matrix, geometric_source_coords, relative_position_index,
                        resize_rel_pos_table, vit)



def _randomize(model, std=0.2, seed=0):
    """Every parameter random (norms, biases, layer scales and position tables included): a wrong
    mapping of any tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _timm_features(tm, img):
    """timm's tokens after the last block, before its final norm: (B, D, H, W) for ViTs."""
    return tm.forward_intermediates(img, indices=1, norm=False, intermediates_only=True)[0]


# ----------------------------------------------------------------------------------------------------
# DeiT / AugReg ViT

def _deit_checkpoint(tm, dim):
    """A DeiT .pth's layout ({'model': ...}: cls_token, pos_embed with its cls entry, norm, head) from a
    timm model without class token (the comparison point: ViT-Adapter's ViT has none)."""
    sd = dict(tm.state_dict())
    g = torch.Generator().manual_seed(1)
    sd["pos_embed"] = torch.cat([torch.randn(1, 1, dim, generator=g), sd["pos_embed"]], dim=1)
    sd["cls_token"] = torch.randn(1, 1, dim, generator=g)
    sd["norm.weight"], sd["norm.bias"] = torch.ones(dim), torch.zeros(dim)
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, dim), torch.zeros(1000)
    return {"model": sd}


def test_deit_equals_timm_and_resizes_pos_embed(tmp_path):
    tm = _randomize(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, class_token=False,
                                      global_pool="avg", num_classes=0))
    path = tmp_path / "deit_tiny.pth"
    torch.save(_deit_checkpoint(tm, 192), path)
    ours = vit("tiny", depth=2).eval()
    ours.load_pretrained(path)
    assert torch.equal(ours.blocks[0].gamma1, torch.ones(192))  # layer scale: not in the file, init 1
    img = torch.randn(2, 3, 224, 224)
    ref = _timm_features(tm, img)
    torch.testing.assert_close(ours(img), ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 1  # a non-trivial comparison

    # another, non-square grid: pos_embed (cls entry dropped) resized bicubically, align_corners=False,
    # no antialias. Reference: timm at that size with timm's own resampling of the table.
    tm2 = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, class_token=False,
                            global_pool="avg", num_classes=0, img_size=(64, 96))
    sd = dict(tm.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (4, 6), (14, 14), num_prefix_tokens=0,
                                             interpolation="bicubic", antialias=False)
    tm2.load_state_dict(sd)
    img = torch.randn(1, 3, 64, 96)
    out = ours(img)
    assert out.shape == (1, 192, 4, 6)
    torch.testing.assert_close(out, _timm_features(tm2.eval(), img), rtol=1e-5, atol=1e-5)


def test_augreg_384_equals_timm_from_timm_layout(tmp_path):
    # AugReg-B/L: pre-trained at 384 (24x24 grid, 577 positions); the czczup .pth files are timm's layout
    tm = _randomize(timm.create_model("vit_base_patch16_384", pretrained=False, depth=1, num_classes=0))
    path = tmp_path / "augreg_b.pth"
    torch.save(tm.state_dict(), path)  # a bare state dict, cls_token / norm included
    ours = vit("base", img_size=384, depth=1).eval()
    ours.load_pretrained(path)
    # timm keeps a cls token in its forward; the ViT of ViT-Adapter does not. Compare with a timm twin
    # without class token, same weights, pos table without the cls entry.
    twin = timm.create_model("vit_base_patch16_384", pretrained=False, depth=1, num_classes=0, class_token=False,
                             global_pool="avg", fc_norm=False)
    sd = {k: v for k, v in tm.state_dict().items() if k != "cls_token"}
    sd["pos_embed"] = sd["pos_embed"][:, 1:]
    twin.load_state_dict(sd)
    img = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(ours(img), _timm_features(twin.eval(), img), rtol=1e-5, atol=1e-5)


def _write_jax_npz(tm, path):
    """The original JAX / AugReg .npz layout of a timm ViT (HWIO conv, (in, out) dense kernels, q/k/v as
    (D, heads, hd), out as (heads, hd, D)): the inverse of timm's reader, which the loader then uses."""
    heads, dim = tm.blocks[0].attn.num_heads, tm.embed_dim
    hd = dim // heads
    t = lambda x: x.detach().numpy()
    w = {"embedding/kernel": t(tm.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": t(tm.patch_embed.proj.bias), "cls": t(tm.cls_token),
         "Transformer/posembed_input/pos_embedding": t(tm.pos_embed),
         "Transformer/encoder_norm/scale": t(tm.norm.weight), "Transformer/encoder_norm/bias": t(tm.norm.bias),
         "head/kernel": t(tm.head.weight.T), "head/bias": t(tm.head.bias)}
    for i, blk in enumerate(tm.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        for j, n in enumerate(("query", "key", "value")):
            w[mha + n + "/kernel"] = t(blk.attn.qkv.weight[j * dim:(j + 1) * dim].T.reshape(dim, heads, hd))
            w[mha + n + "/bias"] = t(blk.attn.qkv.bias[j * dim:(j + 1) * dim].reshape(heads, hd))
        w[mha + "out/kernel"] = t(blk.attn.proj.weight.reshape(dim, heads, hd).permute(1, 2, 0))
        w[mha + "out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)


def test_augreg_npz_through_timms_reader(tmp_path):
    tm = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10))
    path = tmp_path / "Ti_16-i21k.npz"
    _write_jax_npz(tm, path)
    ours = vit("tiny", depth=2).eval()
    ours.load_pretrained(path)
    ref = tm.state_dict()
    for k, v in ours.state_dict().items():
        if k.endswith(("gamma1", "gamma2")):
            assert torch.equal(v, torch.ones_like(v))
        else:
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)


def test_vit_loader_errors(tmp_path):
    ours = vit("tiny", depth=2)
    path = tmp_path / "wrong.pth"
    sd = {k: v for k, v in ours.state_dict().items() if "blocks.1.mlp" not in k}
    torch.save({"model": sd}, path)
    with pytest.raises(UserError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        ours.load_pretrained(path)
    # a 224 checkpoint into a model pre-trained-at-384 is resized (as mmcv's loader does), cls entry kept
    src = vit("tiny", depth=2)
    with torch.no_grad():
        src.pos_embed.normal_()
    torch.save({"model": src.state_dict()}, path)
    big = vit("tiny", img_size=384, depth=2)
    big.load_pretrained(path)
    assert big.pos_embed.shape == (1, 577, 192)
    torch.testing.assert_close(big.pos_embed[:, :1], src.pos_embed[:, :1])


# ----------------------------------------------------------------------------------------------------
# BEiT

def test_beit_equals_timm(tmp_path):
    tb = _randomize(timm.create_model("beit_base_patch16_224", pretrained=False, depth=2, num_classes=0))
    tb.norm = nn.Identity()  # the comparison point: after the last block, cls included
    sd = dict(tb.state_dict())
    sd["blocks.0.attn.relative_position_index"] = torch.zeros(197, 197, dtype=torch.long)  # dropped on load
    sd["lm_head.weight"] = torch.zeros(8192, 768)  # pre-training head: dropped
    path = tmp_path / "beit_base.pth"
    torch.save({"model": sd}, path)
    ours = beit("base", img_size=224, depth=2).eval()
    ours.load_pretrained(path)
    img = torch.randn(2, 3, 224, 224)
    ref = tb.forward_features(img)
    out, hw = ours.forward_features(img)
    assert hw == (14, 14)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the index buffer is ours, and the same construction as timm's
    assert torch.equal(ours.blocks[0].attn.relative_position_index, tb.blocks[0].attn.relative_position_index)
    with pytest.raises(ValueError, match="14x14"):
        ours(torch.randn(1, 3, 192, 192))  # BEiT's grid is fixed


def test_beit_shared_table_is_copied_and_resized(tmp_path):
    src = beit("base", img_size=224, depth=2)
    sd = {k: v for k, v in src.state_dict().items() if "relative_position" not in k}
    shared = torch.randn(27 * 27 + 3, 12, dtype=torch.float32)
    sd["rel_pos_bias.relative_position_bias_table"] = shared  # BEiT pre-training checkpoints share one
    path = tmp_path / "beit_shared.pth"
    torch.save({"model": sd}, path)
    ours = beit("base", img_size=320, depth=2)  # G = 20: 39x39 + 3 rows
    ours.load_pretrained(path)
    expect = resize_rel_pos_table(shared, 39)
    for blk in ours.blocks:
        table = blk.attn.relative_position_bias_table
        assert table.shape == (39 * 39 + 3, 12)
        torch.testing.assert_close(table, expect)
        torch.testing.assert_close(table[-3:], shared[-3:])  # cls rows unchanged
        # relative offset (0, 0) keeps its value: the source and target grids share their centre
        torch.testing.assert_close(table[19 * 39 + 19], shared[13 * 27 + 13])
    assert relative_position_index(20).max() == 39 * 39 + 2


def test_beitv2_deepspeed_layout_loads(tmp_path):
    # unilm/beit2 files: DeepSpeed's {'module': weights, bookkeeping}; a fine-tuned one has fc_norm + head, a
    # pre-training one cls_pt_layers (its patch aggregation) + lm_head; per-block 27x27 + 3 tables, index buffers
    src = beit("base", img_size=224, depth=2)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    extra = {"fc_norm.weight": torch.ones(768), "fc_norm.bias": torch.zeros(768), "head.weight": torch.zeros(10, 768),
             "head.bias": torch.zeros(10), "cls_pt_layers.0.norm1.weight": torch.ones(768),
             "cls_pt_layers.0.attn.qkv.weight": torch.zeros(3 * 768, 768), "lm_head.weight": torch.zeros(8192, 768)}
    path = tmp_path / "beitv2_base_patch16_224_pt1k_ft21k.pth"
    torch.save({"module": {**sd, **extra}, "ds_version": "0.5.8", "global_steps": 1000,
                "param_shapes": [{"blocks.0.norm1.weight": [768]}], "dp_world_size": 64}, path)
    ours = beit("base", img_size=224, depth=2)
    ours.load_pretrained(path)  # raises on any missing / unexpected key
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ----------------------------------------------------------------------------------------------------
# the relative-position resize without SciPy

def test_geometric_progression_root():
    # BEiT's q solves 1 + q + ... + q^12 = dst//2 (bisection to 1e-6); an independent root of the polynomial
    for dst, t in ((79, 39), (59, 29), (63, 31), (111, 55)):
        xs = geometric_source_coords(27, dst)
        roots = np.roots(np.r_[np.ones(12), 1.0 - t])  # q^12 + ... + q + 1 - t
        q = max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 1)
        assert len(xs) == 27 and xs[13] == 0 and xs[14] == 1 and xs[12] == -1
        assert xs[15] - xs[14] == pytest.approx(q, abs=2e-6)
        assert xs[-1] == pytest.approx(t, abs=1e-3)


def _targets(dst):
    t = dst // 2
    return np.arange(-t, t + 1, dtype=np.float64)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator, on a torch indexing change
def test_spline_reproduces_bicubic_polynomials():
    # a not-a-knot cubic spline is exact on cubics; natural splines and linear interpolation are not
    xs = np.array(geometric_source_coords(27, 79))
    p = lambda u: 0.002 * u ** 3 - 0.03 * u ** 2 + 0.5 * u - 1.0
    q = lambda v: -0.001 * v ** 3 + 0.02 * v ** 2 + v + 2.0
    z = p(xs)[:, None] * q(xs)[None, :]  # rows: dy, columns: dx
    table = torch.cat([torch.from_numpy(z.reshape(-1, 1)), torch.tensor([[5.0], [6.0], [7.0]], dtype=torch.float64)])
    out = resize_rel_pos_table(table, 79)
    tg = np.clip(_targets(79), xs[0], xs[-1])  # upstream (FITPACK) clamps to the source range
    truth = (p(tg)[:, None] * q(tg)[None, :]).reshape(-1)
    np.testing.assert_allclose(out[:-3, 0].numpy(), truth, rtol=1e-9, atol=1e-7)
    assert out[-3:, 0].tolist() == [5.0, 6.0, 7.0]
    # the test can fail: timm's SciPy-free fallback (linear on the same geometric grid) is not exact here
    from timm.layers import resize_rel_pos_bias_table
    lin = resize_rel_pos_bias_table(table.float(), (40, 40), (79 * 79 + 3, 1))
    assert np.abs(lin[:-3, 0].double().numpy() - truth).max() > 1e-2


def test_spline_on_smooth_function_beats_linear():
    for dst in (59, 79, 111):
        xs = np.array(geometric_source_coords(27, dst))
        f = lambda y, x: np.exp(-(x ** 2 + 0.5 * y ** 2) / (2 * 12.0 ** 2)) + 0.1 * np.cos(x / 9.0) * np.sin(y / 11.0)
        z = f(xs[:, None], xs[None, :])
        table = torch.cat([torch.from_numpy(z.reshape(-1, 1)), torch.zeros(3, 1, dtype=torch.float64)])
        out = resize_rel_pos_table(table, dst)[:-3, 0].numpy().reshape(dst, dst)
        tg = np.clip(_targets(dst), xs[0], xs[-1])
        truth = f(tg[:, None], tg[None, :])
        err = np.abs(out - truth).max()
        # linear interpolation on the same grid, for scale
        lin_x = np.stack([np.interp(tg, xs, row) for row in z])  # along x
        lin = np.stack([np.interp(tg, xs, col) for col in lin_x.T]).T  # along y
        assert err < 3e-3 and err < 0.2 * np.abs(lin - truth).max(), (dst, err)


def test_spline_matrix_matches_scipy():
    interpolate = pytest.importorskip("scipy.interpolate")
    xs = np.array(geometric_source_coords(27, 63))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((27, 27))
    ref = interpolate.RectBivariateSpline(xs, xs, z, kx=3, ky=3, s=0)(_targets(63), _targets(63))
    W = cubic_spline_matrix(xs, _targets(63)).numpy()
    np.testing.assert_allclose(W @ z @ W.T, ref, rtol=1e-9, atol=1e-9)
