"""common/swin.py against timm's and torchvision's Swin (after weight transfer), the three checkpoint
layouts, table resizing, refusals, the Swin-L parameter count, drop path and gradients.

Tolerance for the reference comparisons: max |ours - ref| <= 1e-4 * max(1, max |ref|) in fp32 (in
practice ours and timm agree bit for bit: the same operations in the same order)."""
import argparse
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
import torchvision
from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock
from timm.models.swin_transformer import checkpoint_filter_fn as timm_filter
from torchvision.models.swin_transformer import _patch_merging_pad as tv_merge_order

from common.io import UserError
from common.swin import (SwinBlock, SwinTransformer, TokenGather, load_swin_pretrained, shift_window_mask,
                         swin, window_token_index)

TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=7)
OUT_NORMS = [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]


def close(got, ref):
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= tol, f"max abs err {err} > {tol}"


def randomise(model, seed=0):
    """Non-trivial values everywhere (LayerNorm weights != 1, biases != 0, strong position bias), so a
    wrong mapping of any tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "relative_position_bias_table" in n:
                p.copy_(r)
            elif p.ndim >= 2:                       # unit-gain weights: O(1) activations and attention logits
                p.copy_(r / p[0].numel() ** 0.5)
            elif p.ndim == 1 and n.endswith("weight"):                 # LayerNorm weights
                p.copy_(1 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
    return model


def timm_swin(img_size, always_partition=False, cfg=TINY, seed=0):
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                          always_partition=always_partition, drop_path_rate=0.0, **cfg)
    return randomise(m, seed).eval()


def ours(**kw):
    return SwinTransformer(**{**TINY, "drop_path_rate": 0.0, **kw}).eval()


def nchw(tokens, hw):
    return tokens.view(tokens.shape[0], *hw, -1).permute(0, 3, 1, 2)   # (B, L, C) -> (B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# equal to the references

@pytest.mark.parametrize("size,always_partition", [
    ((448, 448), False),      # every map a multiple of 7 and larger than it: timm == mmseg semantics
    ((448, 672), False),      # non-square
    ((224, 224), True),       # last map 7x7 == window: timm must be told not to drop the shift (mmseg never does)
])
def test_equal_to_timm(size, always_partition):
    ref_model = timm_swin(size, always_partition)
    model = ours()
    info = load_swin_pretrained(model, ref_model.state_dict())          # also the timm layout
    assert info["missing"] == OUT_NORMS
    randomise(model, seed=1)  # only the out norms are still at their init; make them non-trivial too
    load_swin_pretrained(model, ref_model.state_dict())                 # restore everything else
    assert not torch.equal(model.norm0.weight, torch.ones_like(model.norm0.weight))
    batch = 2 if size[0] == size[1] else 1                              # 2: the mask is shared by images
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model.forward_intermediates(x, intermediates_only=True)
        toks = model.forward_tokens(x)
        outs = model(x)
    assert len(toks) == 4 and len(outs) == 4
    for i, (r, (t, hw)) in enumerate(zip(ref, toks)):
        assert hw == tuple(r.shape[-2:])
        close(nchw(t, hw), r)
        norm = getattr(model, f"norm{i}")
        close(outs[i], norm(r.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_timm_differs_when_it_drops_the_shift():
    """The documented difference: at 224 the last map equals the window and timm (default) drops the shift."""
    ref_model = timm_swin((224, 224), always_partition=False)
    model = ours()
    load_swin_pretrained(model, ref_model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = ref_model.forward_intermediates(x, intermediates_only=True)
        toks = model.forward_tokens(x)
    close(nchw(*toks[2]), ref[2])
    assert (nchw(*toks[3]) - ref[3]).abs().max() > 1e-2


def torchvision_to_ours(tv_sd):
    """torchvision's features.* names -> official names (written here from torchvision's module tree)."""
    out = {}
    for k, v in tv_sd.items():
        p = k.split(".")
        if p[0] != "features":
            continue                                                    # norm, head
        i = int(p[1])
        if i == 0:
            out[{"0": "patch_embed.proj.", "2": "patch_embed.norm."}[p[2]] + p[3]] = v
        elif i % 2 == 1:                                                # blocks of stage (i - 1) / 2
            rest = ".".join(p[3:])
            if rest.endswith("relative_position_index"):
                continue                                                # flattened there; ours is (N, N)
            rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"layers.{(i - 1) // 2}.blocks.{p[2]}.{rest}"] = v
        else:                                                           # patch merging after stage i/2 - 1
            out[f"layers.{i // 2 - 1}.downsample.{'.'.join(p[2:])}"] = v
    return out


def test_equal_to_torchvision_non_divisible():
    """Maps 125x95, 63x48, 32x24, 16x12 are not multiples of 7: torchvision pads before the shift like
    mmseg. Ours gets a 498x378 image (PatchEmbed must pad it), torchvision the same image zero-padded."""
    tv = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 8], window_size=[7, 7],
        stochastic_depth_prob=0.0)
    tv = randomise(tv, seed=3).eval()
    model = ours()
    sd = torchvision_to_ours(tv.state_dict())
    sd.update({k: v for k, v in model.state_dict().items() if k not in sd})   # out norms, our index
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 498, 378, generator=torch.Generator().manual_seed(4))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = F.pad(x_ref, (0, 2, 0, 2))                                      # (1, 3, 500, 380)
    refs = []
    for i, layer in enumerate(tv.features):
        y = layer(y)
        if i % 2 == 1:
            refs.append(y)                                              # (B, H, W, C) after each stage
    toks = model.forward_tokens(x_ours)
    for r, (t, hw) in zip(refs, toks):
        assert hw == tuple(r.shape[1:3])
        close(t.view(r.shape), r)
    assert [hw for _, hw in toks] == [(125, 95), (63, 48), (32, 24), (16, 12)]
    # the backward through padding, shift and crop: same input gradient for the same output cotangents
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(r.shape, generator=g) for r in refs]
    sum((r * c).sum() for r, c in zip(refs, cot)).backward()
    sum((t.view(c.shape) * c).sum() for (t, _), c in zip(toks, cot)).backward()
    close(x_ours.grad, x_ref.grad)
    close(model.layers[1].blocks[1].attn.relative_position_bias_table.grad,
          tv.features[3][1].attn.relative_position_bias_table.grad)


def test_shift_mask_equals_timm():
    for hp, wp, w, s in [(14, 21, 7, 3), (8, 12, 4, 2), (7, 7, 7, 3)]:
        blk = TimmBlock(dim=8, input_resolution=(hp, wp), num_heads=1, window_size=w, shift_size=s,
                        always_partition=True)
        mask = shift_window_mask(hp, wp, w, s, torch.device("cpu"), torch.float32)
        assert torch.equal(mask, blk.attn_mask)
    assert shift_window_mask(14, 21, 7, 3, torch.device("cpu"), torch.float32) is \
        shift_window_mask(14, 21, 7, 3, torch.device("cpu"), torch.float32)      # cached


def test_token_gather_gradient():
    """The fused pad+roll+partition gather and its inverse have exact gradients (with padding and shift)."""
    for h, w, ws, sh in [(5, 3, 4, 2), (4, 4, 2, 1)]:
        take, back = window_token_index(h, w, ws, sh, torch.device("cpu"))
        x = torch.randn(2, h * w, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: TokenGather.apply(t, take, back), (x,))
        y = torch.randn(2, take.numel(), 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: TokenGather.apply(t, back, take), (y,))
        # and it is pad -> roll -> partition, written out
        grid = F.pad(x.detach().view(2, h, w, 3), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        grid = torch.roll(grid, (-sh, -sh), (1, 2))
        hp, wp = grid.shape[1:3]
        ref = grid.view(2, hp // ws, ws, wp // ws, ws, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, -1, 3)
        assert torch.equal(TokenGather.apply(x.detach(), take, back), ref)


def test_small_map_pads_and_keeps_shift():
    """A 3x5 map with window 7: padded to 7x7 after norm1, shifted, cropped (mmseg), i.e. the same as
    attending on the zero-padded 7x7 map; the 7x7 case is checked against timm (always_partition) above."""
    torch.manual_seed(0)
    blk = randomise(SwinBlock(16, 2, window_size=7, shift_size=3)).eval()
    x = torch.randn(2, 15, 16)
    with torch.no_grad():
        got = blk.window_msa(x, (3, 5))
        padded = F.pad(x.view(2, 3, 5, 16), (0, 0, 0, 2, 0, 4)).reshape(2, 49, 16)
        ref = blk.window_msa(padded, (7, 7)).view(2, 7, 7, 16)[:, :3, :5].reshape(2, 15, 16)
        no_shift = SwinBlock(16, 2, window_size=7, shift_size=0).eval()
        no_shift.load_state_dict(blk.state_dict())
        unshifted = no_shift.window_msa(x, (3, 5))
    close(got, ref)
    assert (got - unshifted).abs().max() > 1e-3                         # the shift is not switched off


# ----------------------------------------------------------------------------------------------------
# checkpoint layouts

def timm_to_official(timm_sd, model):
    """Official Microsoft layout, written from the documented rule (downsample at the END of stage i,
    classifier 'head.*', persistent index and shift-mask buffers) and checked with timm's own converter."""
    off = {}
    for k, v in timm_sd.items():
        p = k.split(".")
        if p[0] == "layers" and p[2] == "downsample":
            k = ".".join(["layers", str(int(p[1]) - 1)] + p[2:])
        off[k.replace("head.fc.", "head.")] = v
    for k, v in model.state_dict().items():                             # buffers the official file carries
        if k.endswith("relative_position_index"):
            off[k] = v.clone()
    off["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return off


def unfold_permutation(c):
    """perm[i] = official channel index of mmseg's (nn.Unfold) channel i, both found by running the
    two concatenations on a tensor whose entries are their own (channel, row, col) codes."""
    code = torch.arange(c * 4, dtype=torch.float32).view(c, 2, 2)      # code = ch*4 + row*2 + col
    mm = nn.Unfold(kernel_size=2, stride=2)(code[None])[0, :, 0]        # (4C,)
    off = tv_merge_order(code.permute(1, 2, 0))[0, 0]                    # (H, W, C) -> (1, 1, 4C)
    where = {int(v): j for j, v in enumerate(off.tolist())}
    return torch.tensor([where[int(v)] for v in mm.tolist()])


def official_to_mmseg(off):
    mm = {}
    for k, v in off.items():
        if k.startswith("head."):
            continue                                                    # swin2mmseg drops the head
        if ".downsample." in k:
            perm = unfold_permutation(v.shape[-1] // 4)
            v = v[..., perm]                                             # mmseg channel i <- official perm[i]
        k = k.replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.")
        k = k.replace("mlp.fc2.", "ffn.layers.1.").replace("patch_embed.proj.", "patch_embed.projection.")
        mm[k.replace("layers.", "stages.", 1)] = v
    return mm


def test_layouts_load_identically(tmp_path):
    ref_model = timm_swin((224, 224), always_partition=True)
    timm_sd = ref_model.state_dict()
    model = ours()
    off = timm_to_official(timm_sd, model)
    back = timm_filter(dict(off), ref_model)                           # timm reads our official dict ...
    ref_model.load_state_dict(back, strict=True)                        # ... into exactly its own keys
    mm = official_to_mmseg(off)
    out_norms = {k: torch.randn(v.shape) for k, v in model.state_dict().items() if k in OUT_NORMS}
    mm.update(out_norms)                                                # a fine-tuned mmseg file has them

    files = {
        "official.pth": {"model": off},
        "timm.pth": {f"module.{k}": v for k, v in timm_sd.items()},
        "timm.safetensors": dict(timm_sd),
        "mmseg.pth": {"meta": {"iter": 1}, "state_dict": {**{f"backbone.{k}": v for k, v in mm.items()},
                                                          "decode_head.conv_seg.weight": torch.zeros(2, 8)}},
    }
    from safetensors.torch import save_file
    x = torch.randn(1, 3, 224, 224)
    results = {}
    for name, obj in files.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
        else:
            torch.save(obj, path)
        m = ours()
        info = load_swin_pretrained(m, path)
        assert info["missing"] == ([] if name == "mmseg.pth" else OUT_NORMS), name
        if name == "mmseg.pth":
            assert "decode_head.conv_seg.weight" in info["dropped"]
            for k, v in out_norms.items():
                assert torch.equal(m.state_dict()[k], v)
            m.load_state_dict({k: torch.full_like(v, 1.0 if k.endswith("weight") else 0.0)
                               for k, v in out_norms.items()}, strict=False)
        if name == "official.pth":
            assert {"head.weight", "norm.weight", "layers.0.blocks.1.attn_mask"} <= set(info["dropped"])
        with torch.no_grad():
            results[name] = (m.state_dict(), m(x), m.forward_tokens(x))
    base_sd, base_out, base_tok = results["timm.pth"]
    with torch.no_grad():
        ref = ref_model.forward_intermediates(x, intermediates_only=True)
    for r, (t, hw) in zip(ref, base_tok):
        close(nchw(t, hw), r)
    for name, (sd, out, _) in results.items():
        for k in base_sd:
            assert torch.equal(sd[k], base_sd[k]), (name, k)
        for a, b in zip(out, base_out):
            assert torch.equal(a, b), name


def test_rel_pos_table_resize(tmp_path):
    src = randomise(ours(window_size=7), seed=5)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("norm")}
    torch.save({"model": sd}, tmp_path / "w7.pth")
    dst = ours(window_size=12)
    info = load_swin_pretrained(dst, tmp_path / "w7.pth")
    tables = [k for k in sd if k.endswith("relative_position_bias_table")]
    assert sorted(info["resized"]) == sorted(tables) and len(tables) == 8
    assert info["missing"] == OUT_NORMS
    for k in tables:
        old = sd[k]                                                      # (169, nH)
        ref = F.interpolate(old.t().reshape(1, -1, 13, 13), size=(23, 23), mode="bicubic",
                            align_corners=False).reshape(-1, 529).t()
        new = dst.state_dict()[k]
        assert new.shape == (529, old.shape[1])
        assert torch.equal(new, ref)
    idx = dst.layers[0].blocks[0].attn.relative_position_index
    assert idx.shape == (144, 144) and idx.max() == 23 * 23 - 1
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.isfinite(dst(x)[-1]).all()


def test_wrong_checkpoints_raise(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 512)}
    torch.save(resnet, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="resnet.pth") as e:
        load_swin_pretrained(ours(), tmp_path / "resnet.pth")
    assert "missing" in str(e.value) and "unexpected" in str(e.value)

    other = ours(embed_dim=48)                                           # another width: every shape differs
    torch.save({"model": other.state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(UserError, match="wider.pth") as e:
        load_swin_pretrained(ours(), tmp_path / "wider.pth")
    assert "mis-shaped" in str(e.value)

    # a Namespace beside the weights (as V-PETL's checkpoints have) is kept as inert data: the weights load
    torch.save({"model": ours().state_dict(), "config": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    load_swin_pretrained(ours(), tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="nothere.pth"):
        load_swin_pretrained(ours(), tmp_path / "nothere.pth")


def test_allow_missing_is_substring(tmp_path):
    class AdapterBlock(SwinBlock):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.adaptmlp = nn.Linear(self.dim, self.dim)

    plain_sd = ours().state_dict()
    m = ours(block=AdapterBlock)
    with pytest.raises(UserError, match="adaptmlp"):
        load_swin_pretrained(m, plain_sd)
    info = load_swin_pretrained(m, plain_sd, allow_missing=("adaptmlp",))
    assert len(info["missing"]) == 2 * 8 and all(".adaptmlp." in k for k in info["missing"])   # ours has norm0..3


# ----------------------------------------------------------------------------------------------------
# sizes, stochastic depth, gradients

def test_swin_large_param_count():
    with torch.device("meta"):
        ref = timm.create_model("swin_large_patch4_window7_224", pretrained=False)
        model = swin("large")
    ref_total = sum(p.numel() for p in ref.parameters())
    head_and_norm = sum(p.numel() for p in ref.head.parameters()) + sum(p.numel() for p in ref.norm.parameters())
    out_norms = sum(2 * c for c in (192, 384, 768, 1536))
    ours_total = sum(p.numel() for p in model.parameters())
    assert ours_total == ref_total - head_and_norm + out_norms
    assert round(ours_total / 1e6, 1) == 195.0
    assert model.num_features == [192, 384, 768, 1536]
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
    assert all(isinstance(b.mlp.act, nn.GELU) and b.mlp.act.approximate == "none"
               for s in model.layers for b in s.blocks)
    dp = [b.drop_path.p for s in model.layers for b in s.blocks if not isinstance(b.drop_path, nn.Identity)]
    assert len(dp) == 23 and abs(dp[-1] - 0.3) < 1e-6                  # linspace(0, 0.3, 24), first is 0


def test_drop_path_train_vs_eval():
    model = ours(drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    assert (a - b).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        c, d = model(x)[-1], model(x)[-1]
    assert torch.equal(c, d)


def test_gradient_reaches_every_parameter():
    model = randomise(ours(depths=(2, 2, 2, 2)))
    model.train()
    outs = model(torch.randn(2, 3, 64, 96))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_block_argument_and_fused_attention_agree():
    calls = []

    class Counting(SwinBlock):
        def forward(self, x, hw):
            calls.append(hw)
            return super().forward(x, hw)

    model = randomise(ours(block=functools.partial(Counting)))
    x = torch.randn(1, 3, 100, 60)
    with torch.no_grad():
        plain = model(x)
        from common.swin import WindowAttention
        WindowAttention.fused_attn = True
        try:
            fused = model(x)
        finally:
            WindowAttention.fused_attn = "cuda"
    assert len(calls) == 2 * 8 and calls[0] == (25, 15)
    for a, b in zip(plain, fused):
        close(b, a)
