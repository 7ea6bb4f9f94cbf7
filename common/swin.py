"""Swin Transformer backbone for dense prediction (2-D), faithful to mmseg 1.x ``mmseg/models/backbones/swin.py``
(the Swin of Swin-Transformer-Semantic-Segmentation, which ProPETL and Uni-UVPT build on), with the module
names of Microsoft's official ``Swin-Transformer/models/swin_transformer.py`` so its checkpoints load as
they are.

    model = swin("large", drop_path_rate=0.3)                # Swin-L, 4 outputs after norm0..norm3
    info = load_swin_pretrained(model, "swin_large_patch4_window7_224_22k.pth")   # official / timm / mmseg
    feats = model(images)                                      # [(B, 192, H/4, W/4), ..., (B, 1536, H/32, W/32)]

Semantics (those of mmseg, which differ from the classification code in two places):
- A feature map that is not a multiple of the window is zero-padded right/bottom AFTER norm1 and BEFORE the
  cyclic shift; the shift mask is built on the padded size (regions [0, Hp-w), [Hp-w, Hp-s), [Hp-s, Hp) per
  axis, -100 between regions) and the padding is cropped after the reverse shift. timm rolls before it pads,
  so on such maps it computes something else; torchvision pads first, like mmseg.
- The window is never clipped to the feature size and the shift is never switched off. Microsoft's
  classification code and timm (unless ``always_partition=True``) shrink the window and drop the shift
  when a map is no larger than the window; torchvision drops the shift. At 640x640 input the last stage is
  20x20 > 7, so the difference only shows on small inputs.
- PatchEmbed pads the image right/bottom to a multiple of the patch size, PatchMerging pads odd maps.
- Stage outputs are normed by one LayerNorm per output index (``norm0..norm3``, as mmseg names them);
  official checkpoints do not have them, so after loading one they stay at weight 1 / bias 0.

Layouts: our state dict uses the official names (``layers.i.blocks.j.attn.qkv``, ``layers.i.downsample``
at the END of stage i, patch-merging channels ordered by the 2x2 offsets [(0,0),(1,0),(0,1),(1,1)]).
``convert_swin_state_dict`` reads the official, timm (downsample at the start of stage i+1) and mmseg
(``stages.*``, ``w_msa``, ``ffn.layers``, unfold channel order) layouts.
"""
import functools
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .io import UserError, load_checkpoint, load_state_dict_checked, unwrap_state_dict

SWIN_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


# ----------------------------------------------------------------------------------------------------
# building blocks

class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p:.3f}"


def relative_position_index(w):
    """(w*w, w*w) index into the (2w-1)^2 table: row offset * (2w-1) + col offset, both shifted to >= 0."""
    rows, cols = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()                 # (N,) coordinates of each window token
    dr = rows[:, None] - rows[None, :] + (w - 1)                # (N, N) in [0, 2w-2]
    dc = cols[:, None] - cols[None, :] + (w - 1)
    return dr * (2 * w - 1) + dc


@functools.lru_cache(maxsize=64)
def window_token_index(h, w, window, shift, device):
    """Where each window slot reads its token, for a (h, w) map padded to (hp, wp), rolled by -shift and cut
    into windows (row-major windows, row-major tokens inside each). Returns (take, back): take (nW*N,) holds
    the source token of each slot, h*w meaning a padding zero; back (h*w,) is its inverse (the slot of each
    real token). Cached per size: one gather replaces pad + roll + partition (and its reverse)."""
    hp, wp = -(-h // window) * window, -(-w // window) * window
    pos = torch.full((hp, wp), h * w, dtype=torch.long)
    pos[:h, :w] = torch.arange(h * w).view(h, w)
    if shift:
        pos = torch.roll(pos, shifts=(-shift, -shift), dims=(0, 1))
    take = pos.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1)
    real = take < h * w
    back = torch.empty(h * w, dtype=torch.long)
    back[take[real]] = torch.arange(take.numel())[real]
    return take.to(device), back.to(device)


def _gather_tokens(x, idx):
    """x (B, M, C) -> (B, len(idx), C), x[:, idx]; index M reads a zero row (padding)."""
    if idx.numel() > x.shape[1]:        # more window slots than tokens: the map is padded
        x = F.pad(x, (0, 0, 0, 1))      # (B, M, C) -> (B, M + 1, C), the last row zero
    return x.index_select(1, idx)


class TokenGather(torch.autograd.Function):
    """y = x[:, take] (index x.shape[1] = a zero row). Each real token is read exactly once, so the gradient
    is the gather by the inverse ``back``: no scatter-add, which is slow on CPU."""

    @staticmethod
    def forward(ctx, x, take, back):
        ctx.save_for_backward(take, back)
        return _gather_tokens(x, take)

    @staticmethod
    def backward(ctx, g):
        take, back = ctx.saved_tensors
        return _gather_tokens(g, back), None, None


@functools.lru_cache(maxsize=64)
def shift_window_mask(hp, wp, window, shift, device, dtype):
    """(nW, N, N) additive mask of the shifted windows on a padded (hp, wp) map: 0 inside a region, -100
    across regions. Cached: it depends only on sizes, so each (Hp, Wp, device, dtype) is built once."""
    def region(n):  # per-axis labels: [0, n-w) -> 0, [n-w, n-s) -> 1, [n-s, n) -> 2
        lab = torch.zeros(n, dtype=torch.long)
        lab[n - window:] = 1
        lab[n - shift:] = 2
        return lab
    lab = region(hp)[:, None] * 3 + region(wp)[None, :]        # (hp, wp)
    lab = lab.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = lab[:, :, None] != lab[:, None, :]                  # (nW, N, N)
    return torch.zeros(diff.shape, dtype=dtype).masked_fill_(diff, -100.0).to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative-position bias per head."""

    # F.scaled_dot_product_attention on GPU; on CPU the plain formula measured 1-4% faster
    # (bench/swin_speed.py --attn sdpa vs plain), so it is used there.
    fused_attn = "cuda"     # "cuda": fused on CUDA only, True: always, False: never

    def __init__(self, dim, num_heads, window_size, qkv_bias=True):
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        # mmseg init: trunc-normal(0.02) for linears and the table, zero biases
        for lin in (self.qkv, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def rel_pos_bias(self):
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]   # (N*N, nH)
        return bias.view(n, n, -1).permute(2, 0, 1)                                      # (nH, N, N)

    def forward(self, x, mask=None):
        b_, n, c = x.shape                                      # b_ = B * nW windows of n = w*w tokens
        h = self.num_heads
        qkv = self.qkv(x).view(b_, n, 3, h, c // h).permute(2, 0, 3, 1, 4)   # (3, B*nW, nH, N, d)
        q, k, v = qkv.unbind(0)
        bias = self.rel_pos_bias()                              # (nH, N, N)
        fused = self.fused_attn is True or (self.fused_attn == "cuda" and x.is_cuda)
        if fused:
            if mask is not None:                                # bias + mask: (nW, nH, N, N) -> (B*nW, nH, N, N)
                nw = mask.shape[0]
                bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).unsqueeze(0)
                bias = bias.expand(b_ // nw, -1, -1, -1, -1).reshape(b_, h, n, n)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:                                                   # the same, written out
            attn = (q * self.scale) @ k.transpose(-2, -1)       # (B*nW, nH, N, N)
            if mask is not None:                                # one add of bias + mask: (nW, nH, N, N)
                nw = mask.shape[0]
                attn = attn.view(b_ // nw, nw, h, n, n).add_(bias.unsqueeze(0) + mask.unsqueeze(1)).view(b_, h, n, n)
            else:
                attn = attn.add_(bias)
            x = attn.softmax(dim=-1) @ v                        # (B*nW, nH, N, d)
        x = x.transpose(1, 2).reshape(b_, n, c)                 # (B*nW, nH, N, d) -> (B*nW, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        for lin in (self.fc1, self.fc2):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and MLP, each pre-norm with a residual. Subclass it to add adapters."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True,
                 drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim, self.num_heads, self.window_size, self.shift_size = dim, num_heads, window_size, shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def window_msa(self, x, hw):
        """x (B, L, C), already normed -> (B, L, C). The mmseg steps, in this order: zero-pad right/bottom
        to multiples of the window, roll by -shift, partition into windows, attend (with the shift mask),
        merge windows, roll back by +shift, crop. Pad, roll and partition are one cached gather here (and
        merge, roll back and crop its inverse): on CPU torch.roll and the permute copies cost more than the
        attention itself. Written out, as mmseg does it:
            x = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
            x = torch.roll(x, (-s, -s), dims=(1, 2))
            x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
            ... attention ..., then the same backwards and x[:, :H, :W]."""
        b, _, c = x.shape
        h, w = hw
        ws, s = self.window_size, self.shift_size
        take, back = window_token_index(h, w, ws, s, x.device)
        x = TokenGather.apply(x, take, back)                    # (B, H*W, C) -> (B, nW*N, C)
        mask = None
        if s > 0:
            mask = shift_window_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, s, x.device, x.dtype)
        x = self.attn(x.view(-1, ws * ws, c), mask)             # (B*nW, N, C)
        return TokenGather.apply(x.view(b, -1, c), back, take)  # (B, nW*N, C) -> (B, H*W, C)

    def forward(self, x, hw):
        x = x + self.drop_path(self.window_msa(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution, then LayerNorm; pads the image right/bottom first."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)                                        # (B, C, H, W)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)                        # (B, C, H, W) -> (B, L, C)
        return self.norm(x), hw


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (official order: offsets (0,0), (1,0), (0,1), (1,1) as (row, col)),
    LayerNorm(4C), Linear 4C -> 2C without bias. Odd maps are padded right/bottom."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        nn.init.trunc_normal_(self.reduction.weight, std=0.02)

    def forward(self, x, hw):
        b, _, c = x.shape
        h, w = hw
        x = x.reshape(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (B, H, W, C) -> (B, H/2, 2r, W/2, 2c, C) -> (B, H/2, W/2, c, r, C): channel block index = 2c + r
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.reduction(self.norm(x)), (h // 2, w // 2)


class SwinStage(nn.Module):
    """The blocks of one stage (regular and shifted windows alternating) and the patch merging after them."""

    def __init__(self, blocks, downsample=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x, hw):
        """(B, L, C) -> (B, L, C), before the downsample (the model applies it, keeping the raw output)."""
        for blk in self.blocks:
            x = blk(x, hw)
        return x


class SwinTransformer(nn.Module):
    """Patch embedding, then 4 stages of Swin blocks with patch merging between them; one LayerNorm per
    output index. ``block`` builds every block (a subclass or functools.partial of SwinBlock)."""

    def __init__(self, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.3, patch_size=4, in_chans=3,
                 out_indices=(0, 1, 2, 3), block=SwinBlock):
        super().__init__()
        self.depths, self.window_size, self.out_indices = tuple(depths), window_size, tuple(out_indices)
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n = sum(depths)     # stochastic depth grows linearly with depth: linspace(0, rate, n), in Python (meta-safe)
        dpr = [drop_path_rate * j / max(1, n - 1) for j in range(n)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = self.num_features[i]
            blocks = [block(dim=dim, num_heads=num_heads[i], window_size=window_size,
                            shift_size=0 if j % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                            qkv_bias=qkv_bias, drop_path=dpr[sum(depths[:i]) + j], norm_layer=nn.LayerNorm)
                      for j in range(depth)]
            down = PatchMerging(dim) if i < len(depths) - 1 else None
            self.layers.append(SwinStage(blocks, down))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward_tokens(self, x):
        """Image (B, 3, H, W) -> per stage (tokens (B, L_i, C_i), (H_i, W_i)), raw: before norm{i} and
        before the stage's downsample. All stages, whatever out_indices is."""
        x, hw = self.patch_embed(x)                             # (B, 3, H, W) -> (B, H/4 * W/4, C)
        outs = []
        for stage in self.layers:
            x = stage(x, hw)
            outs.append((x, hw))
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)                 # (B, L, C) -> (B, L/4, 2C)
        return outs

    def forward(self, x):
        """Image (B, 3, H, W) -> [(B, C_i, H_i, W_i) after norm{i} for i in out_indices]."""
        tokens = self.forward_tokens(x)
        outs = []
        for i in self.out_indices:
            t, (h, w) = tokens[i]
            t = getattr(self, f"norm{i}")(t)
            outs.append(t.view(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())   # (B, L, C) -> (B, C, H, W)
        return outs


def swin(size="large", **kw):
    """Swin of a named size (tiny / small / base / large); any constructor argument can be overridden."""
    if size not in SWIN_SIZES:
        raise UserError(f"Swin size '{size}' is not one of {sorted(SWIN_SIZES)}")
    return SwinTransformer(**{**SWIN_SIZES[size], **kw})


# ----------------------------------------------------------------------------------------------------
# checkpoints: official (Microsoft), timm and mmseg layouts -> ours (= official)

# mmseg's PatchMerging uses nn.Unfold: channel index c*4 + m with m the kernel position (0,0),(0,1),(1,0),(1,1);
# official index is j*C + c with j over (0,0),(1,0),(0,1),(1,1). The position swap [0, 2, 1, 3] is its own inverse.
_UNFOLD_TO_OFFICIAL = [0, 2, 1, 3]


def _unfold_to_official(t):
    """(..., 4C) in mmseg's unfold order -> (..., 4C) in the official order."""
    c = t.shape[-1] // 4
    t = t.reshape(*t.shape[:-1], c, 4)[..., _UNFOLD_TO_OFFICIAL]   # (..., C, 4 positions), positions now official
    return t.transpose(-1, -2).reshape(*t.shape[:-2], 4 * c)      # (..., 4, C) -> (..., 4C)


def _detect_layout(sd):
    if any(k.startswith(("stages.", "patch_embed.projection.")) for k in sd):
        return "mmseg"
    downs = {int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.downsample\.", k)] if m}
    if any(k.startswith("head.fc.") for k in sd) or (downs and 0 not in downs):
        return "timm"
    return "official"


def convert_swin_state_dict(sd, dropped=None):
    """Any supported Swin layout -> our (official) names. Strips 'module.' and 'backbone.' prefixes (keys
    outside 'backbone.', e.g. a segmentor's heads, are dropped), drops the classifier 'head.*' and the
    final 'norm.*', undoes timm's stage shift of the downsample and mmseg's names and unfold channel order.
    Keys it does not know are passed on unchanged so that loading reports them. Dropped keys are appended to
    ``dropped`` if given."""
    dropped = [] if dropped is None else dropped
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        dropped.extend(k for k in sd if not k.startswith("backbone."))
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    layout = _detect_layout(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("head.") or k in ("norm.weight", "norm.bias"):
            dropped.append(k)
            continue
        if layout == "mmseg":
            k = k.replace("patch_embed.projection.", "patch_embed.proj.")
            k = re.sub(r"^stages\.", "layers.", k)
            k = k.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
            k = k.replace(".ffn.layers.1.", ".mlp.fc2.")
            if re.match(r"layers\.\d+\.downsample\.(reduction|norm)\.", k):
                v = _unfold_to_official(v)
        elif layout == "timm":
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
            if m:
                k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k] = v
    return out


def resize_rel_pos_tables(sd, model, dropped=None, resized=None):
    """Bicubically resizes (align_corners=False, as mmseg and timm do) each relative-position table whose
    window differs from the model's, e.g. 13^2 -> 23^2 rows for window 7 -> 12. The checkpoint's
    relative_position_index and attn_mask buffers are dropped: the index is deterministic, so the model's own
    is put in its place, and masks are rebuilt per input size."""
    dropped = [] if dropped is None else dropped
    resized = [] if resized is None else resized
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            dropped.append(k)
            continue
        if (k.endswith("relative_position_bias_table") and k in own and v.ndim == 2
                and v.shape != own[k].shape and v.shape[1] == own[k].shape[1]):
            s_old, s_new = math.isqrt(v.shape[0]), math.isqrt(own[k].shape[0])
            if s_old * s_old == v.shape[0] and s_new * s_new == own[k].shape[0]:
                t = v.float().t().reshape(1, -1, s_old, s_old)          # (S*S, nH) -> (1, nH, S, S)
                t = F.interpolate(t, size=(s_new, s_new), mode="bicubic", align_corners=False)
                v = t.reshape(-1, s_new * s_new).t().to(v.dtype)        # (1, nH, S', S') -> (S'*S', nH)
                resized.append(k)
        out[k] = v
    for k, v in own.items():
        if k.endswith("relative_position_index"):
            out[k] = v
    return out


def load_swin_pretrained(model, path_or_sd, allow_missing=()):
    """Loads a Swin checkpoint of any supported layout (a path to a .pth / .safetensors file, or a state
    dict) into ``model``. Missing keys are refused except the out norms norm0..3 (official checkpoints lack
    them) and keys containing any of the SUBSTRINGS in ``allow_missing`` (e.g. ("adaptmlp",)). Unexpected or
    mis-shaped keys raise UserError naming the file. Returns {"missing": [...], "dropped": [...],
    "resized": [...]}: the keys left at their init, the checkpoint keys not used (head, final norm,
    buffers, non-backbone keys), and the resized position tables."""
    if isinstance(path_or_sd, dict):
        obj, source = path_or_sd, "Swin state dict"
    else:
        source = f"Swin checkpoint {os.fspath(path_or_sd)}"
        if os.fspath(path_or_sd).endswith(".safetensors"):
            if not os.path.isfile(path_or_sd):
                raise UserError(f"Swin checkpoint not found: {path_or_sd}")
            from safetensors.torch import load_file
            obj = load_file(os.fspath(path_or_sd))
        else:
            obj = load_checkpoint(path_or_sd, "Swin checkpoint")
    sd = unwrap_state_dict(obj)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{source} holds no state dict of tensors (looked at the file itself and under "
                        "'state_dict', 'model', 'module')")
    dropped, resized = [], []
    sd = convert_swin_state_dict(sd, dropped)
    sd = resize_rel_pos_tables(sd, model, dropped, resized)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    allowed = [k for k in missing if re.match(r"norm\d+\.(weight|bias)$", k)
               or any(s in k for s in allow_missing)]
    load_state_dict_checked(model, sd, source, allow_missing=tuple(allowed))
    return {"missing": allowed, "dropped": dropped, "resized": resized}
