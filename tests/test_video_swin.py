"""common/video_swin.py against torchvision's swin3d (an implementation we did not write) after the key map
of spec 1.7: features and gradients, with the temporal window clipped (8 frames -> 4 tokens < 8) and not
clipped (20 frames -> 10 tokens, temporal shift 4), odd sizes (end padding, odd patch merging); the
relative index and the shift mask against brute force and torchvision; the official checkpoint layout
round trip; the Swin-B parameter count 87,638,984 (spec 1.1).

Tolerance: max |ours - torchvision| <= 1e-4 * max(1, max |torchvision|) in fp32 (both are the same
arithmetic; ours goes through scaled_dot_product_attention, so the last bits differ)."""
import pytest
import torch
from torchvision.models.video import swin3d_b, swin3d_t
from torchvision.models.video.swin_transformer import _compute_attention_mask_3d

from common.io import UserError
from common.video_swin import (clip_window, from_torchvision, load_pretrained, relative_position_index, shift_mask,
                               to_torchvision, video_swin)



def close(a, b):
    return (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """torchvision swin3d_t (random init) and ours loaded from its state dict saved to a file, in train
    mode with drop path 0 in both (so backward is comparable)."""
    torch.manual_seed(0)
    tv = swin3d_t()
    for m in tv.modules():
        if hasattr(m, "p") and type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    path = tmp_path_factory.mktemp("ck") / "swin3d_t.pth"
    torch.save(tv.state_dict(), path)
    ours = video_swin("swin_tiny", drop_path_rate=0.0)
    assert load_pretrained(ours, path) == "torchvision swin3d"
    return tv, ours


def tv_features(tv, x):
    return tv.norm(tv.features(tv.patch_embed(x))).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 64, 64),    # T: 4 tokens < window 8 -> (4, 7, 7), no temporal shift;
                                   # stages 16, 8 (padded to 14, shifted), 4 and 2 (window clipped to the map)
                                   (1, 3, 20, 64, 64),   # T: 10 tokens > 8 -> padded to 16, temporal shift 4
                                   (1, 3, 5, 35, 45)])   # end padding in the patch embedding, odd merging
def test_features_and_gradients_equal_torchvision(pair, shape):
    tv, ours = pair
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # inference: attention through scaled_dot_product_attention
        assert close(ours(x), tv_features(tv, x))
    a, b = ours(x), tv_features(tv, x)  # training (the tables need gradients): the written-out formula
    assert a.shape == b.shape == (shape[0], 768, (shape[2] + 1) // 2, -(-shape[3] // 32), -(-shape[4] // 32))
    assert close(a, b)
    ours.zero_grad(), tv.zero_grad()
    a.square().mean().backward()
    b.square().mean().backward()
    for o, t in [("layers.0.blocks.1.attn.qkv.weight", "features.0.1.attn.qkv.weight"),
                 ("layers.1.blocks.1.attn.relative_position_bias_table",
                  "features.2.1.attn.relative_position_bias_table"),
                 ("layers.2.downsample.reduction.weight", "features.5.reduction.weight"),
                 ("patch_embed.proj.weight", "patch_embed.proj.weight")]:
        go, gt = dict(ours.named_parameters())[o].grad, dict(tv.named_parameters())[t].grad
        assert close(go, gt), o


def test_input_gradients_with_frozen_weights_equal_torchvision(pair):
    """The frozen-backbone case (V-PETL): the tables need no gradient, so attention and its backward go
    through scaled_dot_product_attention."""
    tv, ours = pair
    params = list(tv.parameters()) + list(ours.parameters())
    for p in params:
        p.requires_grad_(False)
    try:
        grads = []
        for f in (ours, lambda x: tv_features(tv, x)):
            x = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
            f(x).square().mean().backward()
            grads.append(x.grad)
        assert close(grads[0], grads[1])
    finally:
        for p in params:
            p.requires_grad_(True)


def test_window_clipping_by_hand():
    assert clip_window((4, 56, 56), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 3, 3))
    assert clip_window((4, 7, 7), (8, 7, 7), (4, 3, 3)) == ((4, 7, 7), (0, 0, 0))
    assert clip_window((10, 8, 3), (8, 7, 7), (4, 3, 3)) == ((8, 7, 3), (4, 3, 0))


def test_relative_position_index_brute_force_and_slice(pair):
    idx = relative_position_index((8, 7, 7))
    coords = [(d, h, w) for d in range(8) for h in range(7) for w in range(7)]
    g = torch.Generator().manual_seed(0)
    for i, j in torch.randint(0, 392, (300, 2), generator=g).tolist():
        (d1, h1, w1), (d2, h2, w2) = coords[i], coords[j]
        assert idx[i, j] == (d1 - d2 + 7) * 169 + (h1 - h2 + 6) * 13 + (w1 - w2 + 6)  # spec 1.3
    assert torch.equal(idx, pair[0].features[0][0].attn.relative_position_index)  # torchvision's
    # the first 196 tokens of the 8x7x7 window are the 4x7x7 window: the sliced offsets are exact there
    sub = idx[:196, :196]
    dd, dh, dw = sub // 169 - 7, sub % 169 // 13 - 6, sub % 13 - 6
    small = torch.tensor([(d, h, w) for d in range(4) for h in range(7) for w in range(7)])
    rel = small[:, None] - small[None]
    assert torch.equal(dd, rel[..., 0]) and torch.equal(dh, rel[..., 1]) and torch.equal(dw, rel[..., 2])


@pytest.mark.parametrize("padded,ws,ss", [((4, 14, 14), (4, 7, 7), (0, 3, 3)), ((16, 14, 21), (8, 7, 7), (4, 3, 3)),
                                          ((8, 8, 8), (8, 4, 4), (4, 2, 2))])
def test_shift_mask_brute_force_and_torchvision(padded, ws, ss):
    mask = shift_mask(padded, ws, ss, "cpu")
    # brute force: region label per voxel with the official slices [0, P-w), [P-w, P-s), [P-s, P)
    def region(c, p, w, s):
        return 0 if s == 0 or c < p - w else (1 if c < p - s else 2)
    nd, nh, nw = (p // w for p, w in zip(padded, ws))
    windows = []
    for bd in range(nd):
        for bh in range(nh):
            for bw in range(nw):
                windows.append([tuple(region(c, p, w, s) for c, p, w, s in
                                      zip((bd * ws[0] + d, bh * ws[1] + h, bw * ws[2] + w), padded, ws, ss))
                                for d in range(ws[0]) for h in range(ws[1]) for w in range(ws[2])])
    assert mask.shape == (len(windows), len(windows[0]), len(windows[0]))
    for k in (0, len(windows) // 2, len(windows) - 1):
        lab = windows[k]
        ref = torch.tensor([[0.0 if a == b else -100.0 for b in lab] for a in lab])
        assert torch.equal(mask[k], ref)
    assert torch.equal(mask, _compute_attention_mask_3d(torch.zeros(1), padded, ws, ss))


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = video_swin("swin_tiny", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    # the official mmaction file, built by hand: {'state_dict': backbone.* + cls_head.fc_cls.*, 'meta': ...}
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["cls_head.fc_cls.weight"], sd["cls_head.fc_cls.bias"] = torch.randn(400, 256), torch.zeros(400)
    path = tmp_path / "swin_tiny_patch244_window877_kinetics400_1k.pth"
    torch.save({"meta": {"epoch": 30}, "state_dict": sd}, path)
    dst = video_swin("swin_tiny", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    assert load_pretrained(dst, path) == "official (mmaction, backbone.*)"
    x = torch.randn(1, 3, 8, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    # torchvision's names and back are the identity
    tv_sd = to_torchvision(src.state_dict())
    assert "features.2.1.mlp.3.weight" in tv_sd and "features.5.reduction.weight" in tv_sd
    assert from_torchvision(tv_sd).keys() == src.state_dict().keys()
    # one missing and one unexpected key: one error naming both
    del sd["backbone.layers.1.blocks.0.mlp.fc2.bias"]
    sd["backbone.layers.9.extra"] = torch.zeros(1)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(UserError) as e:
        load_pretrained(dst, path)
    assert "layers.1.blocks.0.mlp.fc2.bias" in str(e.value) and "layers.9.extra" in str(e.value)
    # another window: the relative tables are reported as mis-shaped, not silently skipped
    other = video_swin("swin_tiny", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=(4, 7, 7))
    torch.save({"state_dict": {"backbone." + k: v for k, v in src.state_dict().items()}}, path)
    with pytest.raises(UserError, match="relative_position_bias_table"):
        load_pretrained(other, path)


def test_swin_b_parameter_count_and_drop_path():
    with torch.device("meta"):
        tv, ours = swin3d_b(), video_swin("swin_base", drop_path_rate=0.4)
    tv_total = sum(p.numel() for p in tv.parameters())
    assert tv_total == 88_048_984
    assert tv_total - sum(p.numel() for p in tv.head.parameters()) == 87_638_984
    assert sum(p.numel() for p in ours.parameters()) == 87_638_984
    assert set(from_torchvision(tv.state_dict())) - {"cls_head.fc_cls.weight", "cls_head.fc_cls.bias"} \
        == set(ours.state_dict())
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0
             for layer in ours.layers for blk in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.4, 24).tolist())
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
