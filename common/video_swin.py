"""Video Swin Transformer (Liu et al., CVPR 2022) as a plain backbone: (B, 3, T, H, W) -> (B, C, T/2, H/32, W/32).

Faithful to the official `SwinTransformer/Video-Swin-Transformer`
(mmaction/models/backbones/swin_transformer.py, `SwinTransformer3D`), whose parameter and buffer names
it keeps (`patch_embed.proj/norm`, `layers.i.blocks.j.{norm1, attn.{qkv, proj,
relative_position_bias_table, relative_position_index}, norm2, mlp.{fc1, fc2}}`,
`layers.i.downsample.{reduction, norm}`, `norm`), so the published checkpoints load as they are; and
tested equal to torchvision's `swin3d_t/s/b` after the key map in `from_torchvision`.

What the official code does and this file keeps:
- patch embedding 2x4x4 by a strided Conv3d, the input zero-padded at the END of T, H, W to multiples
  of the patch, then LayerNorm over channels;
- 3-D (shifted) windows. In every dimension where the feature is not larger than the configured window,
  the window shrinks to the feature size and the shift in that dimension becomes 0 (`get_window_size`):
  8 frames give 4 temporal tokens, so the (8, 7, 7) window runs as (4, 7, 7) and never shifts in time;
- the shift mask (-100 between tokens of different roll regions), built once per padded size;
- the relative position bias table built for the configured window, and its (N_full, N_full) index
  sliced `[:N, :N]` when the window is clipped. That slice is exact when only the leading (temporal)
  dimension shrinks (the first N tokens of an 8x7x7 window are the tokens with d < 4); when H or W
  shrinks too (inputs much smaller than 224) the offsets are those of the first N tokens of the full
  window, which is what the official code and torchvision do, so it is kept for checkpoint fidelity;
- PatchMerging over H and W only, channel order [(h0,w0), (h1,w0), (h0,w1), (h1,w1)], LN(4C) then a
  Linear(4C -> 2C) without bias; drop path linspace(0, rate, all blocks); a final LayerNorm.

Why its own module and not the 2-D `common/swin.py` with T = 1: the 2-D Swin follows mmseg's dense
prediction semantics (it pads the feature to the window and keeps the shift whatever the feature size),
while Video Swin clips the window per dimension and drops the shift where the feature is smaller; one
class serving both would carry a switch through every block. Speed: where the bias table needs no
gradient (inference, frozen backbones as in V-PETL) attention runs through
`F.scaled_dot_product_attention` with the relative bias and the shift mask as one additive mask; where the
table trains, the written-out formula with in-place bias adds; the shift mask is cached and padding /
rolling are skipped where they do nothing. On CPU against torchvision's swin3d with the same weights
(bench/video_swin_speed.py, Swin-T and Swin-B, 1x3x8x224x224): forward 0.83-0.92x, forward+backward with
frozen weights 0.92-0.97x, full training forward+backward 0.97-1.04x (parity: the matmuls are identical).

Open for methods: `SwinTransformer3D(block=...)` takes the block class, and `SwinBlock3D` takes
`attn_layer` / `mlp_layer`, so a paper subclasses `WindowAttention3D` (e.g. to add to k and v in
`qkv_heads`, or to extend the keys in `attend`) or `Mlp` in its own script.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .io import UserError, load_checkpoint, load_state_dict_checked, unwrap_state_dict

# The official configs (configs/recognition/swin/*): embed dim, depths, heads. Window 8x7x7, patch 2x4x4.
ARCHS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


# ----------------------------------------------------------------------------------------------------
# windows

def clip_window(size, window, shift):
    """The official `get_window_size`: where the feature is not larger than the window, the window takes
    the feature size and that dimension is not shifted."""
    window, shift = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return tuple(window), tuple(shift)


def window_partition(x, ws):
    """(B, D, H, W, C) -> (B * nW, N, C); windows ordered (d, h, w) with the batch outermost, tokens in a
    window ordered d, then h, then w."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // ws[0], ws[0], h // ws[1], ws[1], w // ws[2], ws[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], c)


def window_reverse(windows, ws, b, d, h, w):
    """(B * nW, N, C) -> (B, D, H, W, C), the inverse of window_partition."""
    x = windows.view(b, d // ws[0], h // ws[1], w // ws[2], ws[0], ws[1], ws[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


_MASKS = {}


def shift_mask(padded, ws, ss, device):
    """(nW, N, N) additive mask for shifted windows: 0 between tokens of the same roll region, -100
    otherwise. Per dimension the regions of a padded size P are [0, P-w), [P-w, P-s), [P-s, P); a
    dimension that is not shifted is one region. Cached per (padded size, window, shift, device)."""
    key = (tuple(padded), tuple(ws), tuple(ss), str(device))
    if key not in _MASKS:
        labels = torch.zeros(padded, dtype=torch.long)
        for dim in range(3):
            p, w, s = padded[dim], ws[dim], ss[dim]
            lab = torch.zeros(p, dtype=torch.long)
            if s > 0:
                lab[p - w:p - s], lab[p - s:] = 1, 2
            shape = [1, 1, 1]
            shape[dim] = p
            labels = labels * 3 + lab.view(shape)
        win = window_partition(labels[None, ..., None], ws).squeeze(-1)  # (nW, N)
        mask = (win[:, :, None] != win[:, None, :]).float() * -100.0  # (nW, N, N)
        _MASKS[key] = mask.to(device)
    return _MASKS[key]


def relative_position_index(ws):
    """(N, N) index into the ((2Wd-1)(2Wh-1)(2Ww-1), nH) table for the tokens of a Wd x Wh x Ww window:
    (dd + Wd-1) * (2Wh-1)(2Ww-1) + (dh + Wh-1) * (2Ww-1) + (dw + Ww-1), d = coordinate of i - of j."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(w) for w in ws], indexing="ij")).flatten(1)  # (3, N)
    rel = grid[:, :, None] - grid[:, None, :]  # (3, N, N)
    wd, wh, ww = ws
    return (rel[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1) + (rel[2] + ww - 1)


# ----------------------------------------------------------------------------------------------------
# modules

class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside one window with a 3-D relative position bias:
    softmax(q k^T / sqrt(hd) + bias [+ mask]) v, by F.scaled_dot_product_attention where nothing needs
    the bias's gradient (inference, frozen backbones), by the formula where the table trains."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, tuple(window_size), num_heads
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def qkv_heads(self, x):
        """(B_, N, C) -> q, k, v, each (B_, nH, N, hd); q is the first C channels of qkv, k the second."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def position_bias(self, n):
        """(1, nH, N, N): the table gathered by the first N rows and columns of the full-window index."""
        idx = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def attend(self, q, k, v, bias, mask=None):
        """q (B_, nH, N, hd), k and v (B_, nH, M, hd); additive bias (1, nH, N, M) and mask (nW, N, M) or
        None, with B_ = B * nW (batch outer)."""
        b, nh, n, hd = q.shape
        if bias.requires_grad and torch.is_grad_enabled():
            # a bias that needs its gradient sends SDPA to its math path with extra checks: the formula is faster
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1)  # (B_, nH, N, M)
            attn.add_(bias)  # in place: the matmul's backward does not need its output
            if mask is not None:
                attn.view(b // mask.shape[0], mask.shape[0], nh, n, -1).add_(mask[:, None])
            return F.dropout(attn.softmax(-1), self.attn_drop, self.training) @ v
        if mask is not None:  # one (B_, nH, N, M) mask: a 4-D mask keeps SDPA on its fused CPU / GPU kernels
            nw = mask.shape[0]
            bias = (bias + mask[:, None]).expand(b // nw, -1, -1, -1, -1).reshape(b, nh, n, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                              dropout_p=self.attn_drop if self.training else 0.0)

    def forward(self, x, mask=None):
        """x (B_, N, C) windows; mask (nW, N, N) or None, B_ a multiple of nW."""
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        x = self.attend(q, k, v, self.position_bias(n), mask)  # (B_, nH, N, hd)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock3D(nn.Module):
    """Pre-norm block: x + DropPath(W-MSA(LN1(x))), then x + DropPath(MLP(LN2(x))). x is (B, D, H, W, C)."""

    def __init__(self, dim, num_heads, window_size=(8, 7, 7), shift_size=(0, 0, 0), mlp_ratio=4.0,
                 qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 attn_layer=WindowAttention3D, mlp_layer=Mlp):
        super().__init__()
        self.window_size, self.shift_size = tuple(window_size), tuple(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                               proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)

    def window_attention(self, x):
        """(B, D, H, W, C) normalised tokens -> same shape, attention inside (shifted) windows."""
        b, d, h, w, c = x.shape
        ws, ss = clip_window((d, h, w), self.window_size, self.shift_size)
        pad = [(ws[i] - s % ws[i]) % ws[i] for i, s in enumerate((d, h, w))]
        if any(pad):  # zero-pad at the end, AFTER the norm, as the official code does
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        dp, hp, wp = d + pad[0], h + pad[1], w + pad[2]
        mask = None
        if any(ss):
            x = torch.roll(x, shifts=(-ss[0], -ss[1], -ss[2]), dims=(1, 2, 3))
            mask = shift_mask((dp, hp, wp), ws, ss, x.device)
        y = self.attn(window_partition(x, ws), mask)  # (B*nW, N, C)
        x = window_reverse(y, ws, b, dp, hp, wp)  # (B, Dp, Hp, Wp, C)
        if any(ss):
            x = torch.roll(x, shifts=ss, dims=(1, 2, 3))
        if any(pad):
            x = x[:, :d, :h, :w].contiguous()
        return x

    def forward(self, x):
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchMerging(nn.Module):
    """(B, D, H, W, C) -> (B, D, ceil(H/2), ceil(W/2), 2C); time is not merged."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        h, w = x.shape[2:4]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchEmbed3D(nn.Module):
    """(B, 3, T, H, W) -> (B, T/2, H/4, W/4, C), the input zero-padded at the end to multiples of the patch."""

    def __init__(self, patch_size=(2, 4, 4), in_chans=3, embed_dim=96, patch_norm=True):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        t, h, w = x.shape[2:]
        pt, ph, pw = [(p - s % p) % p for p, s in zip(self.patch_size, (t, h, w))]
        if pt or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pt))
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # (B, C, D, H', W') -> (B, D, H', W', C)
        return self.norm(x) if self.norm is not None else x


class BasicLayer(nn.Module):
    """One stage: blocks with shift 0 / window//2 alternating, then PatchMerging (all but the last)."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, qkv_bias, drop, attn_drop,
                 drop_path, downsample, block):
        super().__init__()
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList([
            block(dim, num_heads, window_size=window_size, shift_size=(0, 0, 0) if j % 2 == 0 else shift,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                  drop_path=drop_path[j])
            for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer3D(nn.Module):
    """Video Swin backbone. forward: (B, 3, T, H, W) -> (B, C_last, ceil(T/2), H/32, W/32) after the final LN.
    ``block`` is the block class (default SwinBlock3D); a method passes its own subclass or a partial."""

    def __init__(self, patch_size=(2, 4, 4), in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=(8, 7, 7), mlp_ratio=4.0, qkv_bias=True,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=True, block=SwinBlock3D):
        super().__init__()
        self.depths, self.window_size = tuple(depths), tuple(window_size)
        self.num_features = int(embed_dim * 2 ** (len(depths) - 1))
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # per block, over all stages
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(BasicLayer(
                int(embed_dim * 2 ** i), depth, num_heads[i], self.window_size, mlp_ratio, qkv_bias, drop_rate,
                attn_drop_rate, dpr[first:first + depth], downsample=i < len(depths) - 1, block=block))
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pos_drop(self.patch_embed(x))  # (B, 3, T, H, W) -> (B, D, H', W', C)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 4, 1, 2, 3).contiguous()  # (B, D, H, W, C) -> (B, C, D, H, W)


def video_swin(arch="swin_base", **kw):
    """A Video Swin of one of the official sizes; keyword arguments override (embed_dim, depths, ...)."""
    if arch not in ARCHS:
        raise UserError(f"unknown Video Swin '{arch}': expected one of {', '.join(ARCHS)}")
    return SwinTransformer3D(**{**ARCHS[arch], **kw})


# ----------------------------------------------------------------------------------------------------
# checkpoints: the official mmaction layout and torchvision's swin3d_* layout

def from_torchvision(sd):
    """torchvision swin3d_* keys -> official names (spec 1.7). Its `head.*` comes back as `cls_head.fc_cls.*`.
    features.{2i}.{j}.X -> layers.i.blocks.j.X (mlp.0 / mlp.3 -> mlp.fc1 / mlp.fc2),
    features.{2i+1}.X -> layers.i.downsample.X."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "features":
            f = int(parts[1])
            if f % 2 == 0:
                rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                k = f"layers.{f // 2}.blocks.{parts[2]}.{rest}"
            else:
                k = f"layers.{f // 2}.downsample.{'.'.join(parts[2:])}"
        elif parts[0] == "head":
            k = "cls_head.fc_cls." + ".".join(parts[1:])
        out[k] = v
    return out


def to_torchvision(sd):
    """Official names -> torchvision swin3d_* keys (the inverse of from_torchvision)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            if parts[2] == "blocks":
                rest = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
                k = f"features.{2 * i}.{parts[3]}.{rest}"
            else:
                k = f"features.{2 * i + 1}.{'.'.join(parts[3:])}"
        elif k.startswith("cls_head.fc_cls."):
            k = "head." + k[len("cls_head.fc_cls."):]
        out[k] = v
    return out


def convert_checkpoint(obj, source="checkpoint"):
    """Any published Video Swin checkpoint -> (backbone state dict in our names, layout name).
    Accepts the official mmaction file ({'state_dict': {'backbone.*', 'cls_head.*'}}; MMAction2 1.x names
    the final norm backbone.norm3), torchvision's
    swin3d_* state dict (`features.*`), or a bare backbone dict. The pretraining classifier is dropped."""
    sd = unwrap_state_dict(obj)
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{source}: no state dict found (expected a Video Swin checkpoint)")
    if any(k.startswith("backbone.") for k in sd):
        layout = "official (mmaction, backbone.*)"
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        if "norm3.weight" in sd and "norm.weight" not in sd:  # MMAction2 1.x names the final norm norm3
            layout = "MMAction2 1.x (backbone.*, norm3)"
            sd = {("norm." + k[len("norm3."):] if k.startswith("norm3.") else k): v for k, v in sd.items()}
    elif any(k.startswith("features.") for k in sd):
        layout = "torchvision swin3d"
        sd = from_torchvision(sd)
    elif any(k.startswith("layers.") for k in sd):
        layout = "bare backbone"
    else:
        raise UserError(f"{source}: keys like {list(sd)[:3]} are neither the official Video Swin layout "
                        "('backbone.layers...') nor torchvision's ('features...')")
    return {k: v for k, v in sd.items() if not k.startswith("cls_head.")}, layout


def load_pretrained(backbone, path, allow_missing=()):
    """Loads an official or torchvision Video Swin checkpoint into ``backbone``; missing, unexpected and
    mis-shaped keys are reported in one block (``allow_missing``: full names of parameters the method
    added, which no checkpoint has). Returns the layout name."""
    sd, layout = convert_checkpoint(load_checkpoint(path, "Video Swin checkpoint"), path)
    load_state_dict_checked(backbone, sd, f"{path} ({layout})", allow_missing=tuple(allow_missing))
    return layout
