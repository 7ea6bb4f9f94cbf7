"""UperNet decode head and the auxiliary FCN head, as mmseg builds them (UPerHead, FCNHead).

Reference: mmsegmentation `mmseg/models/decode_heads/uper_head.py`, `psp_head.py`, `fcn_head.py` and
mmcv's ConvModule. Module names follow mmseg's, so the `decode_head.*` / `auxiliary_head.*` keys of
official mmseg / ViT-Adapter checkpoints load without renaming:
    decode_head.psp_modules.{i}.1.{conv,bn}   decode_head.bottleneck.{conv,bn}
    decode_head.lateral_convs.{i}.{conv,bn}   decode_head.fpn_convs.{i}.{conv,bn}
    decode_head.fpn_bottleneck.{conv,bn}      decode_head.conv_seg
    auxiliary_head.convs.0.{conv,bn}          auxiliary_head.conv_seg
Every conv is conv(no bias) + BN + ReLU; the classifier is a 1x1 conv after Dropout2d(0.1). Init as
mmcv: convs kaiming-normal (fan_out, relu), BN 1/0, classifier normal(std 0.01), bias 0.
SyncBN in the configs; in one process or with a per-GPU batch it is plain BN here, and the scripts
convert it with nn.SyncBatchNorm.convert_sync_batchnorm under torchrun on GPUs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvModule(nn.Module):
    """mmcv ConvModule(conv_cfg=None, norm_cfg=BN, act_cfg=ReLU): conv without bias, BN, ReLU."""

    def __init__(self, cin, cout, kernel_size=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """What UPerHead and FCNHead share: Dropout2d then a 1x1 classifier."""

    def __init__(self, channels, num_classes, dropout_ratio=0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x):
        return self.conv_seg(self.dropout(x))


class UPerHead(DecodeHead):
    """Pyramid pooling on the coarsest map + FPN over all maps, fused at stride 4."""

    def __init__(self, in_channels=(192, 384, 768, 1536), channels=512, num_classes=150,
                 pool_scales=(1, 2, 3, 6), dropout_ratio=0.1):
        super().__init__(channels, num_classes, dropout_ratio)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x):
        size = x.shape[2:]
        pooled = [_resize(m(x), size) for m in self.psp_modules]  # each (B, channels, h, w)
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, feats):
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser level
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1)  # (B, 4*channels, H/4, W/4)
        return self.cls_seg(self.fpn_bottleneck(fused))


class FCNHead(DecodeHead):
    """The auxiliary head: ``num_convs`` 3x3 ConvModules on one backbone level, no input concat."""

    def __init__(self, in_channels=768, channels=256, num_classes=150, in_index=2, num_convs=1, dropout_ratio=0.1):
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])

    def forward(self, feats):
        return self.cls_seg(self.convs(feats[self.in_index]))
