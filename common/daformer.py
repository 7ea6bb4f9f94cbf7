"""DAFormer decode head ("context-aware fusion", sepaspp), as DAFormer, ATP and Uni-UVPT configure it.

Reference: DAFormer ``mmseg/models/decode_heads/daformer_head.py`` (+ ``sep_aspp_head.py``, mmcv's
ConvModule / DepthwiseSeparableConvModule), config ``daformer_sepaspp_mitb5``: embed 256, channels 256,
dilations (1, 6, 12, 18), no image pooling, BN, Dropout2d 0.1. Module names are the official ones, so the
``decode_head.*`` keys of DAFormer / ATP / Uni-UVPT checkpoints load without renaming:
    embed_layers.{i}.proj                                  Linear C_i -> embed (bias), on tokens
    fuse_layer.aspp_modules.0.{conv,bn}                    1x1 ConvModule 4*embed -> channels
    fuse_layer.aspp_modules.{1,2,3}.depthwise_conv.{conv,bn}   3x3 depthwise, dilation = padding = d
    fuse_layer.aspp_modules.{1,2,3}.pointwise_conv.{conv,bn}   1x1 -> channels
    fuse_layer.bottleneck.{conv,bn}                        3x3 ConvModule 4*channels -> channels
    conv_seg                                               1x1 classifier after Dropout2d
Every ConvModule is conv (no bias) + BN + ReLU, kaiming-normal (fan_out, relu), BN 1 / 0; the classifier
is normal(0, 0.01) / bias 0; the embedding Linears keep PyTorch's default init (the official head does
not re-initialise them). With MiT-B5 in_channels and 19 classes the head has 3,712,275 parameters.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .upernet import ConvModule, DecodeHead  # ConvModule(cin, cout, kernel_size=1, padding=0, dilation=1, groups=1)

__all__ = ["ConvModule", "DepthwiseSeparableConvModule", "SepASPP", "DAFormerHead"]


class Embed(nn.Module):
    """Linear on the tokens of a map (key ``proj``): (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))            # (B, HW, C_in) -> (B, HW, C_out)
        return x.transpose(1, 2).reshape(b, -1, h, w)


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's: 3x3 depthwise ConvModule (groups = cin) then 1x1 ConvModule cin -> cout, each with BN + ReLU."""

    def __init__(self, cin, cout, kernel_size=3, padding=0, dilation=1):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel_size, padding=padding, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPP(nn.Module):
    """ASPP without image pooling: branch d = 1 is a 1x1 ConvModule, branches d > 1 are depthwise-separable
    3x3 with dilation = padding = d; the branches are concatenated in order and fused by a 3x3 ConvModule."""

    def __init__(self, cin, channels, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else
            DepthwiseSeparableConvModule(cin, channels, 3, padding=d, dilation=d) for d in dilations)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x):
        x = torch.cat([m(x) for m in self.aspp_modules], dim=1)   # (B, n_dil * channels, H, W)
        return self.bottleneck(x)                                  # -> (B, channels, H, W)


class DAFormerHead(DecodeHead):
    """Embeds each of the 4 maps to ``embed_dim`` channels, resizes them to the first map's size (bilinear,
    align_corners=False), concatenates in order 0..3, fuses with SepASPP and classifies (Dropout2d, 1x1)."""

    def __init__(self, in_channels=(64, 128, 320, 512), num_classes=19, embed_dim=256, channels=256,
                 dilations=(1, 6, 12, 18), dropout=0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_channels = tuple(in_channels)
        self.embed_layers = nn.ModuleList(Embed(c, embed_dim) for c in in_channels)
        self.fuse_layer = SepASPP(len(in_channels) * embed_dim, channels, dilations)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [F.interpolate(emb(f), size=size, mode="bilinear", align_corners=False)
             for emb, f in zip(self.embed_layers, feats)]            # 4 x (B, embed, H/4, W/4)
        x = self.fuse_layer(torch.cat(x, dim=1))                     # (B, 4 * embed, ...) -> (B, channels, ...)
        return self.cls_seg(x)                                       # -> (B, K, H/4, W/4)
