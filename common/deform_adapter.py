"""The blocks ViT-Adapter and Uni-UVPT's prompt adapter share, under ViT-Adapter's module names so that
both papers' official checkpoints load: the injector and the extractor (multi-scale deformable attention
between a backbone's tokens and a pyramid of adapter tokens), the extractor's ConvFFN with its one
depth-wise conv over the three token grids, the reference points of the attention, and the official
weight init. What differs between the papers (the spatial prior module, which grids, the interaction
order) stays in their scripts.

Token pyramids: a query grid of (h, w) tokens comes with adapter tokens on the (2h, 2w), (h, w) and
(h/2, w/2) grids, concatenated row-major: 16n + 4n + n = 21n tokens for n = h*w/4.
"""
import math

import torch
import torch.nn as nn
from torchvision.ops import StochasticDepth

from ops import MSDeformAttn

from .mit import Mlp


def conv_bn_relu(cin, cout, stride):
    """3x3 conv (no bias), BN, ReLU: the spatial prior modules' unit, as a list to splice into Sequential."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPrior(nn.Module):
    """ViT-Adapter's spatial prior module, its layers: a ResNet-like stem (three 3x3 conv-BN-ReLU, the first of
    stride 2, then a 3x3 max-pool of stride ``pool_stride``), three stride-2 conv-BN-ReLU (conv2..conv4) and
    1x1 projections with bias to ``embed_dim`` of the first ``levels`` maps (fc1..). ``maps(img)`` gives the
    four conv maps; each paper's forward says which it projects."""

    def __init__(self, inplanes, embed_dim, pool_stride, levels):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(3, inplanes, 2), *conv_bn_relu(inplanes, inplanes, 1),
                                  *conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, pool_stride, 1))
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        for i, width in enumerate((inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes)[:levels]):
            setattr(self, f"fc{i + 1}", nn.Conv2d(width, embed_dim, 1))

    def maps(self, img):
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        return c1, c2, c3, self.conv4(c3)


def pyramid(h, w):
    """The three adapter grids around an (h, w) token grid."""
    return [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]


def reference_points(shapes, device):
    """Centres ((x + 0.5) / w, (y + 0.5) / h) of every cell of every (h, w) grid, row-major:
    (1, sum h*w, 1, 2), (x, y) last."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    return torch.cat(refs)[None, :, None]


def layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class DWConv(nn.Module):
    """One depth-wise 3x3 conv shared by the three grids of the pyramid (tokens 16n / 4n / n of N = 21n)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        k = n // 21
        parts = []
        for t, (hh, ww) in zip(x.split([16 * k, 4 * k, k], dim=1), pyramid(h, w)):
            t = t.transpose(1, 2).reshape(b, c, hh, ww)  # (B, n_l, C) -> (B, C, h_l, w_l)
            parts.append(self.dwconv(t).flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)


class ConvFFN(Mlp):
    """SegFormer's Mix-FFN (fc1 -> depth-wise 3x3 conv -> GELU -> fc2) with the conv run on each grid of the
    pyramid."""

    def __init__(self, dim, hidden):
        super().__init__(dim, hidden)
        self.dwconv = DWConv(hidden)


class Injector(nn.Module):
    """Backbone tokens read the adapter's: x <- x + gamma * MSDA(LN(x), 3 levels of LN(c)). gamma starts at
    ``init_values`` (0 or 1e-6): a new adapter leaves the backbone's features (almost) unchanged."""

    def __init__(self, dim, heads, n_points, ratio, init_values):
        super().__init__()
        self.query_norm, self.feat_norm = layer_norm(dim), layer_norm(dim)
        self.attn = MSDeformAttn(dim, 3, heads, n_points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, c, ref, shapes, starts):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes, starts)


class Extractor(nn.Module):
    """Adapter tokens read the backbone's: c <- c + MSDA(LN(c), LN(x)); then, with the ConvFFN,
    c <- c + DropPath(ConvFFN(LN(c))) (DropPath per sample, as timm's)."""

    def __init__(self, dim, heads, n_points, ratio, cffn_ratio=0.25, drop_path=0.0, with_cffn=True):
        super().__init__()
        self.query_norm, self.feat_norm = layer_norm(dim), layer_norm(dim)
        self.attn = MSDeformAttn(dim, 1, heads, n_points, ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = layer_norm(dim)
            self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, c, x, ref, shapes, starts, h, w):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), shapes, starts)
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), h, w))
        return c


def adapter_init(m):
    """The official _init_weights (``module.apply(adapter_init)``): Linear trunc_normal(.02) and zero bias,
    LN and BN 1 / 0, convs normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups and zero bias.
    MSDeformAttn's own reset runs after it (its modules are Linear too)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
