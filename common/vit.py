"""The plain ViT family as ViT-Adapter uses it: DeiT / AugReg ViTs and BEiT, with their checkpoint loaders.

References (facts, not code, taken from them):
  * ViT-Adapter `segmentation/mmseg_custom/models/backbones/base/vit.py` (TIMMVisionTransformer) and
    `base/beit.py` (BEiT), at czczup/ViT-Adapter fd64a51; the loaders in `mmcv_custom/checkpoint.py`.
  * timm `models/vision_transformer.py` / `models/beit.py` (equal outputs are tested in tests/test_vit.py).

What the adapter needs and nothing more: ``patch_embed``, ``pos_embed``, ``cls_token`` and ``blocks``
(an nn.ModuleList walked by the adapter in its own forward). No final norm, no head.

ViT (DeiT, AugReg):
  * pre-norm blocks (LN eps 1e-6), one qkv Linear with bias, MLP 4x with GELU;
  * learnable layer scale ``gamma1`` / ``gamma2`` initialised to 1 (absent from the checkpoints, trained);
  * ``pos_embed`` is 1 x (G*G + 1) x D as pre-trained (G = img_size / 16, img_size 224, or 384 for
    AugReg-B/L); every forward drops its cls entry and resizes the G x G grid bicubically
    (align_corners=False) to the current grid. There is no cls token in the forward.
BEiT:
  * qkv Linear without bias, the bias being cat(q_bias, 0, v_bias); layer scale ``gamma_1`` / ``gamma_2``;
  * a relative position bias per block: (2G-1)^2 + 3 rows x heads (the 3 extra rows: cls->token,
    token->cls, cls->cls), G = img_size / 16 fixed: the token grid must be G x G (no dynamic size);
  * a cls token, no absolute position embedding.

Checkpoints (``load_pretrained``): DeiT ``.pth`` ({'model': ...}), AugReg in timm layout (``.pth``) or as
the original JAX ``.npz`` (read by timm's own npz loader), BEiT / BEiT v2 ``.pth`` with the relative
position tables resized to the training grid by the BEiT method (geometric source coordinates, cubic
spline), implemented here without SciPy: see ``resize_rel_pos_table``. BEiT v2 files (unilm/beit2, e.g.
``beitv2_large_patch16_224_pt1k_ft21k.pth``) are saved by DeepSpeed: the weights sit under ``'module'``
beside DeepSpeed's bookkeeping, and a pre-training file also holds the patch-aggregation layers
``cls_pt_layers.*`` and ``lm_head``; the blocks have BEiT's names, so the same filter serves both.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

from .io import UserError, load_checkpoint, load_state_dict_checked, state_dict_of, strip_prefix

# (embed_dim, depth, num_heads)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def _is_vit_key(name):
    """The plain ViT's own keys: a subclass that adds modules (the adapter) still loads a ViT checkpoint
    with load_pretrained, and only these keys must come from it."""
    return name.startswith(("patch_embed.", "pos_embed", "cls_token", "blocks."))


def _linspace(rate, depth):
    """Stochastic depth rule linspace(0, rate, depth), in Python (also under a meta-device build)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def _layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    """Conv k16 s16 with bias. (B, 3, h, w) -> (B, H*W, D), plus the grid (H, W)."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, D, H, W)
        h, w = x.shape[2:]
        return x.flatten(2).transpose(1, 2), (h, w)  # (B, H*W, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Global multi-head self-attention, scale head_dim^-0.5 (fused by scaled_dot_product_attention)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """ViT block with the official code's layer scale (gamma1, gamma2 = 1 at init)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, layer_scale=True):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.ones(dim))
            self.gamma2 = nn.Parameter(torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma2 is None else self.gamma2 * m)


class VisionTransformer(nn.Module):
    """DeiT / AugReg ViT without cls token, final norm or head. ``img_size`` is the PRE-TRAINING size: it
    fixes the pos_embed grid, which every forward resizes to the input's grid."""

    cls_token = None  # the official ViTAdapter sets it to None: DeiT/AugReg features carry no cls token

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, layer_scale=True, block=Block):
        super().__init__()
        self.embed_dim, self.patch_size, self.drop_path_rate = embed_dim, patch_size, drop_path_rate
        self.pretrain_grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        # zeros as upstream (the real values come from the checkpoint); the first entry is the unused cls one
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid[0] * self.pretrain_grid[1] + 1, embed_dim))
        dpr = _linspace(drop_path_rate, depth)
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], layer_scale)
                                    for i in range(depth))

    def resized_pos_embed(self, h, w):
        """The pre-training grid without its cls entry, resized bicubically to (h, w): (1, h*w, D)."""
        gh, gw = self.pretrain_grid
        pos = self.pos_embed[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # (1, h*w, D)

    def embed(self, img):
        """Patch tokens with position: (B, H*W, D), (H, W)."""
        x, (h, w) = self.patch_embed(img)
        return x + self.resized_pos_embed(h, w), (h, w)

    def forward_features(self, img):
        """Tokens after the last block, (B, H*W, D), and the grid (H, W)."""
        x, hw = self.embed(img)
        for blk in self.blocks:
            x = blk(x)
        return x, hw

    def forward(self, img):
        x, (h, w) = self.forward_features(img)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D, H, W)

    def load_pretrained(self, path):
        """DeiT .pth / AugReg .pth (timm layout) / AugReg .npz. Reports missing or unexpected keys."""
        sd = _read_vit_npz(path) if os.fspath(path).endswith(".npz") else \
            state_dict_of(load_checkpoint(path, "--pretrained"), f"--pretrained {path}")
        sd = vit_checkpoint_filter(strip_prefix(sd, "module."), self)
        return load_state_dict_checked(self, sd, f"--pretrained {path}", expect=_is_vit_key)


def vit_checkpoint_filter(sd, model):
    """DeiT / timm ViT state dict -> this module's: drops cls_token, norm, head (and DeiT's distillation
    entries); keeps pos_embed with its cls entry, resized bicubically if the checkpoint's grid differs
    from the model's pre-training grid (as mmcv's loader does); layer scales that the checkpoint lacks are
    kept at their init value 1 (upstream trains them from there)."""
    drop = ("cls_token", "dist_token", "reg_token", "norm.", "fc_norm.", "pre_logits.", "head.", "head_dist.")
    out = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        pe = out["pos_embed"]
        n_prefix = 1 if round(math.sqrt(pe.shape[1] - 1)) ** 2 == pe.shape[1] - 1 else 0
        g = round(math.sqrt(pe.shape[1] - n_prefix))
        grid = pe[:, n_prefix:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=model.pretrain_grid, mode="bicubic", align_corners=False)
        cls = pe[:, :1] if n_prefix else torch.zeros_like(pe[:, :1])
        out["pos_embed"] = torch.cat([cls, grid.flatten(2).transpose(1, 2).to(pe.dtype)], dim=1)
    for k, v in model.state_dict().items():  # gamma1/gamma2: not in DeiT/AugReg checkpoints
        if _is_vit_key(k) and k.endswith(("gamma1", "gamma2")) and k not in out:
            out[k] = v
    return out


def _read_vit_npz(path):
    """An original AugReg / JAX ViT .npz through timm's own npz loader: build the matching timm
    VisionTransformer from the array shapes, let timm fill it, return its state dict (timm layout)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT, _load_weights
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"--pretrained not found: {path}")
    try:
        w = np.load(path)
        kernel = w["embedding/kernel"]  # (p, p, 3, D)
        pos = w["Transformer/posembed_input/pos_embedding"]  # (1, N(+1), D)
        depth = sum(1 for k in w.files if k.startswith("Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale"))
        heads = w["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape[1]
    except Exception as e:  # KeyError, ValueError, OSError, EOFError (empty), BadZipFile (truncated)
        raise UserError(f"--pretrained {path}: not a ViT .npz in the JAX/AugReg layout "
                        f"({type(e).__name__}: {e})") from None
    has_cls = "cls" in w.files
    n_grid = pos.shape[1] - (1 if has_cls else 0)
    g = round(math.sqrt(n_grid))
    num_classes = w["head/bias"].shape[-1] if "head/bias" in w.files else 0
    m = TimmViT(img_size=g * kernel.shape[0], patch_size=kernel.shape[0], embed_dim=kernel.shape[3], depth=depth,
                num_heads=heads, num_classes=num_classes, class_token=has_cls,
                global_pool="token" if has_cls else "avg")
    try:
        with torch.no_grad():
            _load_weights(m, path)
    except Exception as e:  # an array missing or damaged further in
        raise UserError(f"--pretrained {path}: not a complete ViT .npz ({type(e).__name__}: {e})") from None
    return m.state_dict()


# ----------------------------------------------------------------------------------------------------
# BEiT

def relative_position_index(g):
    """(G*G+1, G*G+1) indices into a table of (2G-1)^2 + 3 rows: token pairs by their (dy, dx), then the
    rows cls->token, token->cls, cls->cls (the BEiT / Swin construction)."""
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, G*G)
    rel = coords[:, :, None] - coords[:, None, :] + (g - 1)  # (2, G*G, G*G), each in [0, 2G-2]
    n = (2 * g - 1) ** 2
    idx = torch.empty(g * g + 1, g * g + 1, dtype=torch.long)
    idx[1:, 1:] = rel[0] * (2 * g - 1) + rel[1]
    idx[0, :] = n
    idx[:, 0] = n + 1
    idx[0, 0] = n + 2
    return idx


class BEiTAttention(nn.Module):
    def __init__(self, dim, num_heads, grid, qkv_bias=True):
        super().__init__()
        self.num_heads, self.grid = num_heads, grid
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        # persistent, as upstream: the official segmentation checkpoints carry it
        self.register_buffer("relative_position_index", relative_position_index(grid))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        if n != self.grid * self.grid + 1:
            raise ValueError(f"BEiT was built for a {self.grid}x{self.grid} token grid (+cls), got {n} tokens: "
                             f"the input must be {self.grid * 16}x{self.grid * 16} (pad smaller windows)")
        bias = None if self.q_bias is None else torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        rel = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        rel = rel.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=rel.to(qkv.dtype))
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class BEiTBlock(nn.Module):
    def __init__(self, dim, num_heads, grid, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, init_values=1e-6):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = BEiTAttention(dim, num_heads, grid, qkv_bias)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class BEiT(nn.Module):
    """BEiT with a relative position bias per block for a fixed grid G = img_size / 16 (img_size is the
    TRAINING crop here: 512, 640, 480 ...). Tokens are [cls, patches]."""

    pos_embed = None  # BEiT uses relative positions only (use_abs_pos_emb=False in every config)

    def __init__(self, img_size=640, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, init_values=1e-6, block=BEiTBlock):
        super().__init__()
        self.embed_dim, self.patch_size, self.drop_path_rate = embed_dim, patch_size, drop_path_rate
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = _linspace(drop_path_rate, depth)
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, self.grid, mlp_ratio, qkv_bias, dpr[i], init_values)
                                    for i in range(depth))
        self.apply(_beit_init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, img):
        """Patch tokens (no position: BEiT's positions are the per-block relative biases)."""
        return self.patch_embed(img)

    def forward_features(self, img):
        """Tokens after the last block with cls first, (B, 1 + H*W, D), and the grid (H, W)."""
        x, hw = self.embed(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x, hw

    def forward(self, img):
        x, (h, w) = self.forward_features(img)
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D, H, W)

    def load_pretrained(self, path):
        sd = strip_prefix(state_dict_of(load_checkpoint(path, "--pretrained"), f"--pretrained {path}"), "module.")
        return load_state_dict_checked(self, beit_checkpoint_filter(sd, self), f"--pretrained {path}",
                                       expect=_is_vit_key)


def _beit_init(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def beit_checkpoint_filter(sd, model):
    """BEiT / BEiT v2 .pth -> this module's state dict, as ViT-Adapter's loader does it: a shared
    ``rel_pos_bias`` table is copied into every block; ``relative_position_index`` is dropped (the model
    builds its own); each table is resized from the checkpoint grid to the model's (2G-1)^2 by
    ``resize_rel_pos_table``; pre-training heads and norms (BEiT v2: also its cls_pt_layers) are dropped."""
    sd = dict(sd)
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        for i in range(len(model.blocks)):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    drop = ("mask_token", "lm_head.", "norm.", "fc_norm.", "head.", "pos_embed", "rel_pos_bias.", "cls_pt_layers.")
    out = {}
    for k, v in sd.items():
        if k.startswith(drop) or k.endswith("relative_position_index"):
            continue
        if k.endswith("relative_position_bias_table"):
            v = resize_rel_pos_table(v, 2 * model.grid - 1)
        out[k] = v
    for k, v in model.state_dict().items():  # the index buffers are the model's own
        if _is_vit_key(k) and k.endswith("relative_position_index"):
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------
# relative position tables: BEiT's geometric-progression resize, without SciPy

def geometric_source_coords(src, dst):
    """BEiT's source coordinates for a (src x src) table fitted to a (dst x dst) one: find q in [1.01, 1.5]
    by bisection (to 1e-6) so that 1 + q + ... + q^(src//2 - 1) ~ dst//2, then place the src entries at
    -d_k .. -d_1, 0, d_1 .. d_k with d_i = 1 + q + ... + q^(i-1). Near the centre the step is ~1 (the
    entries keep their meaning there); far out they are stretched to reach +-dst//2."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    d, cur = [], 1.0
    for i in range(src // 2):
        d.append(cur)
        cur += q ** (i + 1)
    return [-x for x in reversed(d)] + [0.0] + d


def cubic_spline_matrix(x, t):
    """The linear map from values at the (sorted, non-uniform) nodes ``x`` to the values at ``t`` of the
    interpolating cubic spline with NOT-A-KNOT end conditions: (len(t), len(x)) float64.

    This is the spline FITPACK builds for s=0, k=3 (knots at the nodes except the second and the
    second-to-last), i.e. what scipy's interp2d(kind='cubic') and RectBivariateSpline(kx=ky=3, s=0) fit
    on a grid. Targets outside [x_0, x_-1] are clamped to it, as FITPACK's evaluation (fpbisp) does.

    Second derivatives M solve A M = R y:
      interior i:  h[i-1] M[i-1] + 2 (h[i-1] + h[i]) M[i] + h[i] M[i+1] = 6 (dy[i]/h[i] - dy[i-1]/h[i-1])
      not-a-knot:  the third derivative is continuous at x_1 and x_{n-2}.
    On [x_i, x_i+1] with a = x_i+1 - t, b = t - x_i:
      S(t) = M_i a^3/(6h) + M_i+1 b^3/(6h) + (y_i/h - M_i h/6) a + (y_i+1/h - M_i+1 h/6) b."""
    x = torch.as_tensor(x, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).clamp(x[0], x[-1])
    n = x.numel()
    if n < 4:
        raise ValueError("a not-a-knot cubic spline needs at least 4 nodes")
    h = x[1:] - x[:-1]  # (n-1,)
    A = torch.zeros(n, n, dtype=torch.float64)
    R = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        R[i, i - 1], R[i, i], R[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, 0], A[0, 1], A[0, 2] = h[1], -(h[0] + h[1]), h[0]
    A[-1, -3], A[-1, -2], A[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    Mop = torch.linalg.solve(A, R)  # (n, n): node values -> second derivatives
    seg = torch.searchsorted(x, t, right=True).sub(1).clamp(0, n - 2)  # interval of each target
    hi = h[seg]
    a, b = x[seg + 1] - t, t - x[seg]
    rows = torch.arange(t.numel())
    W = torch.zeros(t.numel(), n, dtype=torch.float64)
    W[rows, seg] += a / hi
    W[rows, seg + 1] += b / hi
    W += (a ** 3 / (6 * hi) - a * hi / 6)[:, None] * Mop[seg]
    W += (b ** 3 / (6 * hi) - b * hi / 6)[:, None] * Mop[seg + 1]
    return W


def resize_rel_pos_table(table, dst_side, num_extra=3):
    """(S*S + extra, heads) -> (dst_side^2 + extra, heads): BEiT's resize of a relative position table.
    Source entries sit on ``geometric_source_coords``, the targets are the integers -t..t (t = dst//2),
    each head is interpolated by a bicubic not-a-knot spline (separable on the grid: W_y Z W_x^T), and the
    ``num_extra`` cls rows are appended unchanged."""
    src_side = round(math.sqrt(table.shape[0] - num_extra))
    if src_side * src_side + num_extra != table.shape[0]:
        raise UserError(f"relative position table of {table.shape[0]} rows is not S*S + {num_extra}")
    if src_side == dst_side:
        return table
    grid, extra = table[:-num_extra], table[-num_extra:]
    xs = geometric_source_coords(src_side, dst_side)
    t = dst_side // 2
    W = cubic_spline_matrix(xs, torch.arange(-t, t + 1, dtype=torch.float64))  # (dst, src)
    z = grid.double().T.reshape(-1, src_side, src_side)  # (heads, S_y, S_x)
    out = W @ z @ W.T  # (heads, dst, dst)
    out = out.reshape(out.shape[0], -1).T.to(table.dtype)  # (dst*dst, heads)
    return torch.cat([out, extra], dim=0)


# ----------------------------------------------------------------------------------------------------
# the variants of the paper's tables

def vit(size="tiny", img_size=224, **kw):
    """DeiT-T/S/B (img_size 224) or AugReg-T (224) / -B / -L (384) ViT: the architecture is the same."""
    dim, depth, heads = SIZES[size]
    return VisionTransformer(img_size=img_size, embed_dim=dim, depth=kw.pop("depth", depth),
                             num_heads=heads, **kw)


def beit(size="large", img_size=640, **kw):
    dim, depth, heads = SIZES[size]
    return BEiT(img_size=img_size, embed_dim=dim, depth=kw.pop("depth", depth), num_heads=heads, **kw)
