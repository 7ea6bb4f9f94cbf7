"""Mix Transformer (MiT-B0..B5), SegFormer's encoder, as DAFormer / ATP / Uni-UVPT use it.

Faithful to NVlabs SegFormer ``mmseg/models/backbones/mix_transformer.py`` (copied unchanged into DAFormer,
ATP and Uni-UVPT), with its module names, so the ImageNet ``mit_b*.pth`` files load without renaming:

    model = mit("mit_b5", drop_path_rate=0.1)
    info = load_mit_pretrained(model, "mit_b5.pth")    # NVlabs / mmseg / DAFormer / ATP / Uni-UVPT files
    feats = model(images)                              # [(B, 64, H/4, W/4), (B, 128, H/8, W/8),
                                                       #  (B, 320, H/16, W/16), (B, 512, H/32, W/32)]

Per stage i (1..4): ``patch_embed{i}`` (overlapping conv 7/4/3 for the first stage, 3/2/1 after, then
LayerNorm eps 1e-5) -> ``block{i}`` (pre-norm blocks, LayerNorm eps 1e-6: efficient attention whose keys and
values come from a map reduced by a conv of kernel = stride = sr (+ LayerNorm eps 1e-5), then a Mix-FFN
fc1 -> depthwise 3x3 conv -> GELU -> fc2) -> ``norm{i}`` (eps 1e-6) -> NCHW map. Stochastic depth rates
grow linearly from 0 to ``drop_path_rate`` over all blocks in order. No dropout (0 in every config).

The eps values are the official code's. mmseg's own ``mit.py`` uses 1e-6 for every LayerNorm and HF
transformers' ``SegformerModel`` 1e-5 for every one; weights carry over between all three unchanged.

Checkpoint layouts read by ``load_mit_pretrained``: NVlabs (ours; ``head.*`` classifier dropped), mmseg's
converted layout (``layers.{i}.{0,1,2}``, ``attn.attn.in_proj_*``, 1x1-conv FFN ``ffn.layers.{0,1,4}``), and
full segmentor files (``backbone.*``; ATP's ``model.`` student / ``ema_model.`` teacher prefixes), each
optionally wrapped in ``state_dict`` / ``model``.
"""
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import UserError, load_checkpoint, load_state_dict_checked, unwrap_state_dict
from .swin import DropPath

_COMMON = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))
MIT_SIZES = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_COMMON),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), **_COMMON),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), **_COMMON),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), **_COMMON),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), **_COMMON),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), **_COMMON),
}


# ----------------------------------------------------------------------------------------------------
# building blocks

class OverlapPatchEmbed(nn.Module):
    """Conv with kernel > stride (patches overlap), then LayerNorm (eps 1e-5) over channels."""

    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)                       # (B, Cin, H, W) -> (B, C, H/s, W/s)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)       # -> (B, N = H/s * W/s, C)
        return self.norm(x), h, w


class Attention(nn.Module):
    """Efficient self-attention: queries from every token, keys / values from the map reduced sr times per
    side by a strided conv (+ LayerNorm eps 1e-5). Head dim C / heads, scale head_dim^-0.5."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, sr_ratio=1):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, h, w):
        b, n, c = x.shape
        nh = self.num_heads
        q = self.q(x).reshape(b, n, nh, c // nh).transpose(1, 2)            # (B, nh, N, hd)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.sr(x).flatten(2).transpose(1, 2)                        # (B, N', C), N' = (h/sr)(w/sr)
            x = self.norm(x)
        kv = self.kv(x).reshape(b, -1, 2, nh, c // nh).permute(2, 0, 3, 1, 4)  # (2, B, nh, N', hd)
        x = F.scaled_dot_product_attention(q, kv[0], kv[1])                  # softmax(q k^T / sqrt(hd)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3x3 conv on the token grid: Mix-FFN's positional information (key ``mlp.dwconv.dwconv``)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))               # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)                                  # -> (B, N, C)


class Mlp(nn.Module):
    """Mix-FFN: fc1 -> depthwise 3x3 conv -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm block (LayerNorm eps 1e-6): x + DropPath(attn(norm1(x))), then x + DropPath(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4, qkv_bias=True, drop_path=0.0, sr_ratio=1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


# ----------------------------------------------------------------------------------------------------
# the backbone

class MixVisionTransformer(nn.Module):
    """Four stages (patch_embed{i}, block{i}, norm{i}); forward returns the four NCHW maps at strides
    4, 8, 16, 32. ``block_cls`` lets a method subclass Block without touching this file."""

    def __init__(self, embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), num_heads=(1, 2, 5, 8),
                 sr_ratios=(8, 4, 2, 1), mlp_ratio=4, in_chans=3, drop_path_rate=0.1, qkv_bias=True,
                 block_cls=Block):
        super().__init__()
        self.embed_dims, self.depths = tuple(embed_dims), tuple(depths)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth per block
        cur = 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1], embed_dim=embed_dims[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                block_cls(embed_dims[i], num_heads[i], mlp_ratio, qkv_bias, dpr[cur + j], sr_ratios[i])
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            cur += depths[i]
        self.apply(_init_weights)

    def stage(self, i):
        """i in 0..3 -> (patch_embed, blocks ModuleList, norm) of stage i + 1."""
        return (getattr(self, f"patch_embed{i + 1}"), getattr(self, f"block{i + 1}"),
                getattr(self, f"norm{i + 1}"))

    def forward(self, x):
        outs = []
        for i in range(4):
            patch_embed, blocks, norm = self.stage(i)
            x, h, w = patch_embed(x)                                         # (B, N, C_i), N = h * w
            for blk in blocks:
                x = blk(x, h, w)
            x = norm(x).reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # -> (B, C_i, h, w)
            outs.append(x)
        return outs


def _init_weights(m):
    """SegFormer's init: Linear trunc-normal(0.02) / bias 0, LayerNorm 1 / 0, Conv normal(0, sqrt(2 / fan_out))
    with fan_out = k * k * out / groups, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def mit(name="mit_b5", **kw):
    """MiT of a named size (mit_b0 .. mit_b5); any constructor argument can be overridden."""
    if name not in MIT_SIZES:
        raise UserError(f"MiT size '{name}' is not one of {sorted(MIT_SIZES)}")
    return MixVisionTransformer(**{**MIT_SIZES[name], **kw})


# ----------------------------------------------------------------------------------------------------
# checkpoints: NVlabs (ours), mmseg-converted, and segmentor files (DAFormer / ATP / Uni-UVPT)

def _from_mmseg(k, v):
    """One key of mmseg's MiT layout -> our (NVlabs) key(s): a list of (key, tensor)."""
    m = re.match(r"layers\.(\d+)\.(\d)\.(.*)", k)
    if not m:
        return [(k, v)]
    s, part, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    if part == "0":                                            # PatchEmbed: projection, norm
        return [(f"patch_embed{s}." + rest.replace("projection.", "proj.", 1), v)]
    if part == "2":                                            # stage-end norm
        return [(f"norm{s}.{rest}", v)]
    j, rest = rest.split(".", 1)
    pre = f"block{s}.{j}."
    if rest in ("attn.attn.in_proj_weight", "attn.attn.in_proj_bias"):
        c = v.shape[0] // 3                                    # rows [q; k; v]; our kv Linear is [k; v]
        suffix = rest.rsplit("_", 1)[1]
        return [(pre + f"attn.q.{suffix}", v[:c]), (pre + f"attn.kv.{suffix}", v[c:])]
    rest = rest.replace("attn.attn.out_proj.", "attn.proj.")
    ffn = re.match(r"ffn\.layers\.([014])\.(weight|bias)$", rest)
    if ffn:
        name = {"0": "fc1", "1": "dwconv.dwconv", "4": "fc2"}[ffn.group(1)]
        if ffn.group(1) != "1" and ffn.group(2) == "weight":
            v = v.flatten(1)                                   # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        rest = f"mlp.{name}.{ffn.group(2)}"
    return [(pre + rest, v)]


def convert_mit_state_dict(sd, dropped=None):
    """Any supported MiT layout -> our names. Takes the backbone out of a segmentor state dict (the ATP
    student ``model.`` before the teacher ``ema_model.``), drops the ImageNet classifier ``head.*``, and
    renames mmseg's layout. Unknown keys pass through so that loading reports them. Keys not used are
    appended to ``dropped``. Returns (state dict, layout name)."""
    dropped = [] if dropped is None else dropped
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for prefix in ("model.", "ema_model."):                    # ATP: student first
        if any(k.startswith(prefix + "backbone.") for k in sd):
            dropped.extend(k for k in sd if not k.startswith(prefix))
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if any(k.startswith("backbone.") for k in sd):
        dropped.extend(k for k in sd if not k.startswith("backbone."))
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    layout = "mmseg" if any(re.match(r"layers\.\d+\.[012]\.", k) for k in sd) else "nvlabs"
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            dropped.append(k)
            continue
        out.update(_from_mmseg(k, v) if layout == "mmseg" else [(k, v)])
    return out, layout


def load_mit_pretrained(model, path_or_state_dict, allow_missing=(), verbose=True):
    """Loads a MiT checkpoint of any supported layout (a path or a state dict) into ``model``. Missing,
    unexpected or mis-shaped keys raise UserError naming the file, except missing keys containing one of
    the SUBSTRINGS in ``allow_missing`` (modules a method added). Returns {"layout", "dropped", "missing"}:
    the layout found, the checkpoint keys not used (classifier, decode heads, the ATP teacher) and the
    allowed missing keys. Prints one line naming the dropped keys when there are any."""
    if isinstance(path_or_state_dict, dict):
        obj, source = path_or_state_dict, "MiT state dict"
    else:
        source = f"MiT checkpoint {os.fspath(path_or_state_dict)}"
        obj = load_checkpoint(path_or_state_dict, "MiT checkpoint")
    sd = unwrap_state_dict(obj)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{source} holds no state dict of tensors (looked at the file itself and under "
                        "'state_dict', 'model', 'module')")
    dropped = []
    sd, layout = convert_mit_state_dict(sd, dropped)
    own = model.state_dict()
    if "patch_embed1.proj.weight" not in sd:   # e.g. a Swin file: its norm1..3 alone would look like ours
        first = ", ".join(list(sd)[:3])
        raise UserError(f"{source} is not a MiT (SegFormer) checkpoint: no patch_embed1.proj.weight (nor "
                        f"mmseg's layers.0.0.projection.weight) among its backbone keys ({first}, ...)")
    allowed = [k for k in own if k not in sd and any(s in k for s in allow_missing)]
    load_state_dict_checked(model, sd, source, allow_missing=tuple(allowed))
    if dropped and verbose:
        groups = sorted({k.split(".")[0] + ".*" for k in dropped})
        print(f"{source} ({layout} layout): ignored {len(dropped)} keys outside the backbone: "
              f"{', '.join(groups)}")
    return {"layout": layout, "dropped": dropped, "missing": allowed}
