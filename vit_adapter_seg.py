"""ViT-Adapter (ICLR 2023) for semantic segmentation: a plain ViT + a spatial prior and injector /
extractor interactions by multi-scale deformable attention, with UperNet (+ FCN auxiliary head).

Chen, Duan, Wang, He, Lu, Dai, Qiao, "Vision Transformer Adapter for Dense Predictions". Official code:
github.com/czczup/ViT-Adapter (segmentation/, mmseg 0.20.2); this file follows it at fd64a51:
`mmseg_custom/models/backbones/{adapter_modules,vit_adapter,beit_adapter}.py`, the configs of
`segmentation/configs/{ade20k,coco_stuff10k,coco_stuff164k,pascal_context}/upernet_*`,
`mmcv_custom/layer_decay_optimizer_constructor.py` and `image_demo.py`. Spec: shared/papers/vit_adapter.md.

    # ADE20K, ViT-Adapter-B + UperNet from DeiT-B (8 GPUs x 2 images, as the paper):
    torchrun --nproc_per_node=8 vit_adapter_seg.py --preset ade20k_deit_base \
        --data-root data/ade/ADEChallengeData2016 --pretrained pretrained/deit_base_patch16_224-b5f2ef4d.pth \
        --work-dir work_dirs/ade_deit_b
    # BEiT-L at 640 (gradient checkpointing on by the preset):
    torchrun --nproc_per_node=8 vit_adapter_seg.py --preset ade20k_beit_large \
        --data-root data/ade/ADEChallengeData2016 --pretrained pretrained/beit_large_patch16_224_pt22k_ft22k.pth
    # evaluate a released checkpoint, single scale or multi-scale + flip:
    python vit_adapter_seg.py --preset ade20k_deit_tiny --data-root ... --eval-only \
        --checkpoint upernet_deit_adapter_tiny_512_160_ade20k.pth.tar [--ms-flip]
    # image demo (upstream image_demo.py): writes demo/ADE_val_00000591.jpg, the colour overlay
    python vit_adapter_seg.py --preset ade20k_deit_tiny --checkpoint upernet_deit_adapter_tiny_512_160_ade20k.pth.tar \
        --demo data/ade/ADEChallengeData2016/images/validation/ADE_val_00000591.jpg --palette ade20k --work-dir demo
    # quick start on the CPU, no files (a small ViT-Adapter, a minute or two):
    torchrun --nproc_per_node=2 vit_adapter_seg.py --preset synthetic --work-dir work_dirs/quick
    # parameter counts (no data, no weights): python vit_adapter_seg.py --preset ade20k_beit_large --summary

Choices, where the official code is odd (reproduced unless said otherwise):
- the extractors' DropPath uses the backbone's maximum drop_path_rate, the same in every extractor
  (the author called it unintentional, issue #167); ViT blocks use linspace(0, rate, depth);
- ViT layer scales gamma1/gamma2 start at 1 and are trained although no checkpoint has them;
- layer-wise lr decay: layer 0 = pos_embed / cls_token / patch_embed, i+1 = block i, the rest (adapter,
  heads) depth+1; weight decay 0 only for 1-D parameters and '.bias' -- the pos_embed / cls_token
  exemption of the official constructor compares unprefixed names and never fires, so they, level_embed
  and the relative position tables get weight decay here too; AugReg-B has no layer decay but mmcv
  custom_keys (first match after sorting by length then name: 'head' biases keep lr x1);
- the loss is mmseg's CE averaged over all pixels (ignored ones count as 0);
- SyncBN (SPM, output norms, heads) is SyncBN under torchrun on GPUs, BN otherwise;
- fp16 configs (DeiT, AugReg-T/B) train with autocast + GradScaler(init 512) on GPUs (--amp), fp32 on CPU;
- BEiT has a fixed token grid: slide windows smaller than the crop are padded (pitfall 2 of the spec);
- --ms-flip: the ratios 0.5..1.75 + flip of the BEiT-640 configs (SETR_Resize there; mmseg keep-ratio
  scales + multiples of 32 for the others, which ship no multi-scale config); each scale is a bilinear
  resize of the normalised original image (mmseg resizes the uint8 image: rounding differs);
- one image per process trains BN on one image (the PPM's 1x1 pooling cannot): refused unless SyncBN.
"""
import argparse
import functools
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torchvision.ops import StochasticDepth
from tqdm import tqdm

from common import dist as D
from common.io import UserError, cli, load_checkpoint, load_state_dict_checked, strip_prefix, unwrap_state_dict
from common.palettes import PALETTES, get_palette, save_overlay
from common.seg_data import (DATASETS, SyntheticSeg, TestTransform, TrainTransform, build_dataset, imread,
                             rescale_size)
from common.segment import (EncoderDecoder, collate_single, evaluate, overlay_writer, pad_batch, predict,
                            resize)
from common.train import RunBook, count_params, init_lr, set_lr, summary, warmup_poly_mmcv
from common.upernet import FCNHead, UPerHead
from common.vit import BEiT, SIZES, VisionTransformer
from ops import MSDeformAttn

# ----------------------------------------------------------------------------------------------------
# Presets: every UperNet row of the README tables (spec 1.8, 5.2-5.4). Each value can be overridden.

IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
HALF = ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))  # AugReg-B/L configs
# adapter size (spec 1.8): deform heads, value ratio, drop path, interaction indexes, injector gamma init
ADAPTER = {
    "tiny": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.1, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "small": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.2, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "base": dict(deform_heads=12, deform_ratio=0.5, drop_path=0.3, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "large": dict(deform_heads=16, deform_ratio=0.5, drop_path=0.4, indexes=((0, 5), (6, 11), (12, 17), (18, 23))),
}


@dataclass
class Preset:
    """One official config. Sizes come from ADAPTER / common.vit.SIZES unless overridden here."""
    backbone: str            # 'vit' (DeiT / AugReg) or 'beit'
    size: str                # tiny / small / base / large
    dataset: str
    crop: int
    scale: tuple             # training img_scale (long, short), random ratio 0.5-2
    test_scale: tuple        # keep-ratio test resize (long, short), then to a multiple of 32
    stride: int              # slide inference stride (window = crop)
    iters: int
    lr: float
    weight_decay: float
    layer_decay: float = 0.0  # 0: none
    custom_keys: bool = False  # AugReg-B's mmcv custom_keys instead of layer decay
    pretrain_size: int = 224  # ViT position grid of the checkpoint (AugReg-B/L: 384); BEiT: unused
    drop_path: float = None  # None: ADAPTER[size]
    init_values: float = 0.0  # injector gamma (and BEiT layer scale) init
    head_channels: int = 512
    norm: tuple = IMAGENET
    with_cp: bool = False
    amp: bool = False
    eval_interval: int = 16000  # ADE 16k, COCO-Stuff / Pascal 8k (iterations)
    warmup: int = 1500          # linear warmup iterations (ratio 1e-6, mmcv style)
    pretrained: str = ""     # the official pre-training file (for the user; never downloaded)
    overrides: dict = field(default_factory=dict)  # model dims for the small synthetic preset


_ADE = dict(dataset="ade20k", crop=512, scale=(2048, 512), test_scale=(2048, 512), stride=341, iters=160_000)
_80K = dict(iters=80_000, eval_interval=8000)
_BEIT_L = dict(backbone="beit", size="large", lr=2e-5, weight_decay=0.05, layer_decay=0.90, drop_path=0.3,
               init_values=1e-6, head_channels=1024, with_cp=True,
               pretrained="beit_large_patch16_224_pt22k_ft22k.pth")
PRESETS = {
    "ade20k_deit_tiny": Preset("vit", "tiny", **_ADE, lr=1.2e-4, weight_decay=0.01, layer_decay=0.95, amp=True,
                               pretrained="deit_tiny_patch16_224-a1311bcf.pth"),
    "ade20k_deit_small": Preset("vit", "small", **_ADE, lr=6e-5, weight_decay=0.01, layer_decay=0.95, amp=True,
                                pretrained="deit_small_patch16_224-cd65a155.pth"),
    "ade20k_deit_base": Preset("vit", "base", **_ADE, lr=6e-5, weight_decay=0.01, layer_decay=0.95, amp=True,
                               pretrained="deit_base_patch16_224-b5f2ef4d.pth"),
    "ade20k_augreg_tiny": Preset("vit", "tiny", **_ADE, lr=1.2e-4, weight_decay=0.01, layer_decay=0.95, amp=True,
                                 pretrained="Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-"
                                            "steps_20k-lr_0.03-res_224.pth"),
    "ade20k_augreg_base": Preset("vit", "base", **_ADE, lr=2e-5, weight_decay=0.01, custom_keys=True,
                                 pretrain_size=384, norm=HALF, amp=True,
                                 pretrained="B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
                                            "steps_20k-lr_0.01-res_384.pth"),
    "ade20k_augreg_large": Preset("vit", "large", **_ADE, lr=2e-5, weight_decay=0.05, layer_decay=0.95,
                                  pretrain_size=384, norm=HALF, with_cp=True,
                                  pretrained="L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--"
                                             "imagenet2012-steps_20k-lr_0.01-res_384.pth"),
    "ade20k_beit_large": Preset(**_BEIT_L, dataset="ade20k", crop=640, scale=(2048, 640), test_scale=(2048, 640),
                                stride=426, iters=160_000),
    "coco_stuff10k_beit_large": Preset(**_BEIT_L, dataset="coco_stuff10k", crop=512, scale=(2048, 512),
                                       test_scale=(2048, 512), stride=341, **_80K),
    "coco_stuff164k_beit_large": Preset(**_BEIT_L, dataset="coco_stuff164k", crop=640, scale=(2560, 640),
                                        test_scale=(2560, 640), stride=426, **_80K),
    "pascal_context59_beit_large": Preset(**_BEIT_L, dataset="pascal_context59", crop=480, scale=(520, 520),
                                          test_scale=(4096, 520), stride=320, **_80K),
    # no files: the quick start and the tests. A narrow 4-block ViT-Adapter on 96x96 images, 64x64 crops.
    "synthetic": Preset("vit", "tiny", dataset="synthetic", crop=64, scale=(96, 96), test_scale=(96, 96), stride=32,
                        iters=200, lr=1e-3, weight_decay=0.01, layer_decay=0.95, pretrain_size=64, head_channels=64,
                        eval_interval=200, warmup=20,
                        overrides=dict(embed_dim=64, depth=4, num_heads=2, deform_heads=4,
                                       indexes=((0, 0), (1, 1), (2, 2), (3, 3)))),
}
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--preset", default="synthetic", choices=sorted(PRESETS), help="an official config (README row)")
    a("--dataset", default=None, choices=sorted(DATASETS), help="dataset in its official layout (default: preset's)")
    a("--data-root", default=None, help="dataset root (not needed for synthetic)")
    a("--work-dir", default="work_dirs/vit_adapter", help="holds last.pt, best.pt, log.jsonl, vis/, demo outputs")
    a("--pretrained", default=None, help="ViT checkpoint: DeiT .pth, AugReg .pth (timm layout) or .npz, BEiT .pth")
    a("--head", default="upernet", choices=["upernet"], help="decode head (Mask2Former: a later addition)")
    # model (preset values by default)
    a("--embed-dim", type=int, default=None, help="override the ViT width")
    a("--depth", type=int, default=None, help="override the ViT depth")
    a("--num-heads", type=int, default=None, help="override the ViT heads")
    a("--deform-heads", type=int, default=None, help="deformable attention heads (T/S 6, B 12, L 16)")
    a("--deform-ratio", type=float, default=None, help="value dim / width in MSDeformAttn (T/S 1.0, B/L 0.5)")
    a("--interaction-indexes", type=int, nargs="+", default=None,
      help="first and last block of each interaction, flat: 0 2 3 5 6 8 9 11")
    a("--cffn-ratio", type=float, default=0.25, help="ConvFFN hidden / width (paper 0.25)")
    a("--n-points", type=int, default=4, help="sampling points per head and level (paper 4)")
    a("--conv-inplane", type=int, default=64, help="spatial prior module width (paper 64)")
    a("--drop-path", type=float, default=None, help="stochastic depth (T .1, S .2, B .3, L .4 / BEiT-L .3)")
    a("--init-values", type=float, default=None, help="injector gamma init (ViT 0, BEiT 1e-6)")
    a("--pretrain-size", type=int, default=None, help="ViT position grid x16 of --pretrained (224; AugReg-B/L 384)")
    a("--head-channels", type=int, default=None, help="UperNet channels (512; BEiT-L 1024); FCN aux: 256")
    a("--with-cp", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing (L: on)")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="fp16 autocast on GPU (the fp16 configs)")
    # schedule
    a("--iters", type=int, default=None, help="iterations (ADE 160k, COCO / Pascal 80k)")
    a("--batch-size", type=int, default=16, help="global batch over all processes (paper 16 = 8 x 2)")
    a("--lr", type=float, default=None, help="AdamW lr")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay")
    a("--layer-decay", type=float, default=None, help="layer-wise lr decay rate (0: none)")
    a("--custom-keys", action=argparse.BooleanOptionalAction, default=None, help="AugReg-B's custom_keys groups")
    a("--warmup", type=int, default=None, help="linear warmup iterations (1500; ratio 1e-6, mmcv style)")
    a("--crop", type=int, default=None, help="training crop and slide window (512 / 640 / 480)")
    a("--scale", type=int, nargs=2, default=None, help="training img_scale (long short)")
    a("--test-scale", type=int, nargs=2, default=None, help="test keep-ratio resize (long short)")
    a("--stride", type=int, default=None, help="slide stride (341 / 426 / 320)")
    a("--eval-mode", default="slide", choices=["slide", "whole"], help="test inference (the configs: slide)")
    a("--ms-flip", action="store_true", help="multi-scale (0.5-1.75) + flip test")
    a("--eval-interval", type=int, default=None, help="evaluate and keep the best every N iterations (16k / 8k)")
    a("--ckpt-interval", type=int, default=1000, help="write last.pt every N iterations")
    a("--log-interval", type=int, default=50, help="log the loss every N iterations")
    a("--num-classes", type=int, default=None, help="synthetic only: number of classes (default 6)")
    a("--num-samples", type=int, default=None, help="synthetic only: images per split")
    a("--workers", type=int, default=2, help="data-loading processes per training process")
    a("--seed", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--resume", action="store_true", help="continue exactly from work-dir/last.pt")
    a("--eval-only", action="store_true", help="evaluate --checkpoint (or work-dir/best.pt) and exit")
    a("--checkpoint", default=None, help="weights for --eval-only / --demo: ours or an official .pth(.tar)")
    a("--demo", default=None, metavar="IMAGE", help="segment one image, write the overlay to work-dir/<name>")
    a("--palette", default=None, choices=sorted(PALETTES), help="demo colours (default: the dataset's)")
    a("--opacity", type=float, default=0.5, help="demo overlay opacity")
    a("--summary", action="store_true", help="print parameter counts per module group and exit (no data)")
    a("--vis", type=int, default=8, help="colour overlays written to work-dir/vis per evaluation")
    a("--stop-at", type=int, default=None, help="stop after this iteration as if interrupted (tests --resume)")
    args = p.parse_args(argv)
    pr = PRESETS[args.preset]
    args.dataset = args.dataset or pr.dataset
    ad = {**ADAPTER[pr.size], **pr.overrides}
    dim, depth, heads = SIZES[pr.size]
    fill = dict(embed_dim=ad.get("embed_dim", dim), depth=ad.get("depth", depth), num_heads=ad.get("num_heads", heads),
                deform_heads=ad["deform_heads"], deform_ratio=ad["deform_ratio"],
                drop_path=pr.drop_path if pr.drop_path is not None else ad["drop_path"],
                init_values=pr.init_values, pretrain_size=pr.pretrain_size, head_channels=pr.head_channels,
                with_cp=pr.with_cp, amp=pr.amp, iters=pr.iters, lr=pr.lr, weight_decay=pr.weight_decay,
                layer_decay=pr.layer_decay, custom_keys=pr.custom_keys, crop=pr.crop, scale=pr.scale,
                test_scale=pr.test_scale, stride=pr.stride, eval_interval=pr.eval_interval, warmup=pr.warmup)
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.interaction_indexes is None:
        args.interaction_indexes = [list(ij) for ij in ad["indexes"]]
    else:
        ii = args.interaction_indexes
        if len(ii) % 2 or any(ii[k] > ii[k + 1] for k in range(0, len(ii), 2)):
            p.error("--interaction-indexes: pairs 'first last' of blocks, e.g. 0 2 3 5 6 8 9 11")
        args.interaction_indexes = [ii[k:k + 2] for k in range(0, len(ii), 2)]
    if args.interaction_indexes[-1][1] >= args.depth:
        p.error(f"--interaction-indexes reach block {args.interaction_indexes[-1][1]} of a {args.depth}-block ViT")
    if args.crop % 32:
        p.error(f"--crop {args.crop}: ViT-Adapter needs sides that are multiples of 32")
    args.backbone, args.size, args.norm = pr.backbone, pr.size, pr.norm
    args.scale, args.test_scale = tuple(args.scale), tuple(args.test_scale)
    if args.dataset != "synthetic" and not (args.summary or args.demo) and not args.data_root:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    return args


# ----------------------------------------------------------------------------------------------------
# Model: spatial prior module, injector, extractor with ConvFFN, interactions (spec 1.1-1.7)

def _conv_bn_relu(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """A ResNet-like stem and three stride-2 convs: c1 (stride 4, a map) and c2..c4 (strides 8/16/32, as
    token lists), each projected to the ViT width by a 1x1 conv with bias."""

    def __init__(self, inplanes=64, embed_dim=384):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, img):
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        # (B, D, h, w) -> (B, h*w, D) for the strides 8, 16, 32 (row-major tokens)
        return (self.fc1(c1), self.fc2(c2).flatten(2).transpose(1, 2), self.fc3(c3).flatten(2).transpose(1, 2),
                self.fc4(c4).flatten(2).transpose(1, 2))


def _reference_points(shapes, device):
    """Centres ((x + 0.5) / W, (y + 0.5) / H) of every cell of every level, (1, sum HW, 1, 2), (x, y) last."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    return torch.cat(refs)[None, :, None]


def deform_inputs(h, w, device):
    """(reference points, spatial shapes, level starts) of the injector (queries: the 1/16 ViT grid, keys:
    SPM levels 1/8, 1/16, 1/32) and of the extractor (queries: all SPM tokens, keys: the 1/16 ViT grid)."""
    levels = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    shapes = torch.as_tensor(levels, dtype=torch.long, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    inj = (_reference_points(levels[1:2], device), shapes, starts)
    ext = (_reference_points(levels, device), shapes[1:2], shapes.new_zeros(1))
    return inj, ext


class DWConv(nn.Module):
    """One depth-wise 3x3 conv shared by the three SPM levels, whose tokens are 16n / 4n / n of N = 21n."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        k = n // 21
        parts = []
        for t, (hh, ww) in zip(x.split([16 * k, 4 * k, k], dim=1), [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]):
            t = t.transpose(1, 2).reshape(b, c, hh, ww)  # (B, n_l, C) -> (B, C, h_l, w_l)
            parts.append(self.dwconv(t).flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)


class ConvFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


def _norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


def _maybe_cp(enabled, fn, *args):
    """torch.utils.checkpoint when asked and gradients flow (upstream: with_cp and x.requires_grad)."""
    if enabled and torch.is_grad_enabled() and any(a.requires_grad for a in args if torch.is_tensor(a)):
        return cp.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Injector(nn.Module):
    """ViT tokens query the spatial prior: x <- x + gamma * MSDA(LN(x), 3 levels of LN(c))."""

    def __init__(self, dim, heads, n_points, ratio, init_values):
        super().__init__()
        self.query_norm, self.feat_norm = _norm(dim), _norm(dim)
        self.attn = MSDeformAttn(dim, 3, heads, n_points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, c, ref, shapes, starts):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes, starts)


class Extractor(nn.Module):
    """Spatial-prior tokens query the ViT: c <- c + MSDA(LN(c), LN(x)); c <- c + DropPath(ConvFFN(LN(c)))."""

    def __init__(self, dim, heads, n_points, ratio, with_cffn, cffn_ratio, drop_path):
        super().__init__()
        self.query_norm, self.feat_norm = _norm(dim), _norm(dim)
        self.attn = MSDeformAttn(dim, 1, heads, n_points, ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = _norm(dim)
            self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, c, x, ref, shapes, starts, h, w):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), shapes, starts)
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), h, w))
        return c


class InteractionBlock(nn.Module):
    """injector -> ViT blocks [s..e] -> extractor (-> 2 extra extractors in the last interaction). With a
    cls token (BEiT) the injector and extractor see patch tokens only; cls joins the blocks."""

    def __init__(self, dim, heads, n_points, ratio, init_values, with_cffn, cffn_ratio, drop_path, extra, with_cp):
        super().__init__()
        self.with_cp = with_cp
        self.injector = Injector(dim, heads, n_points, ratio, init_values)
        self.extractor = Extractor(dim, heads, n_points, ratio, with_cffn, cffn_ratio, drop_path)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, heads, n_points, ratio, with_cffn, cffn_ratio, drop_path) for _ in range(2)) \
            if extra else None

    def forward(self, x, c, cls, blocks, inj, ext, h, w):
        x = _maybe_cp(self.with_cp, functools.partial(self.injector, ref=inj[0], shapes=inj[1], starts=inj[2]), x, c)
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
        for blk in blocks:
            x = _maybe_cp(self.with_cp, blk, x)
        if cls is not None:
            cls, x = x[:, :1], x[:, 1:]
        for extractor in [self.extractor] + list(self.extra_extractors or []):
            c = _maybe_cp(self.with_cp, functools.partial(extractor, ref=ext[0], shapes=ext[1], starts=ext[2],
                                                          h=h, w=w), c, x)
        return x, c, cls


class AdapterMixin:
    """The adapter around a plain ViT (VisionTransformer or BEiT): the ViT's modules stay where the
    official checkpoints have them (patch_embed, pos_embed, cls_token, blocks), the adapter's beside
    them (level_embed, spm, interactions, up, norm1..4). forward(img) -> 4 maps at strides 4/8/16/32."""

    def add_adapter(self, interaction_indexes, deform_heads, deform_ratio, init_values, n_points=4, conv_inplane=64,
                    cffn_ratio=0.25, with_cffn=True, add_vit_feature=True, use_extra_extractor=True, with_cp=False):
        dim = self.embed_dim
        self.interaction_indexes = [tuple(ij) for ij in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim)
        n = len(self.interaction_indexes)
        self.interactions = nn.Sequential(*[
            InteractionBlock(dim, deform_heads, n_points, deform_ratio, init_values, with_cffn, cffn_ratio,
                             self.drop_path_rate, use_extra_extractor and i == n - 1, with_cp) for i in range(n)])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        for m in (self.up, self.spm, self.interactions):
            m.apply(_adapter_init)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, img):
        b, _, h, w = img.shape
        if h % 32 or w % 32:
            raise ValueError(f"ViT-Adapter needs input sides that are multiples of 32, got {h}x{w}")
        inj, ext = deform_inputs(h, w, img.device)
        c1, c2, c3, c4 = self.spm(img)
        n2, n3 = c2.shape[1], c3.shape[1]
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        x, (gh, gw) = self.embed(img)  # (B, H*W, D) patch tokens (+ resized pos_embed for DeiT / AugReg)
        cls = self.cls_token.expand(b, -1, -1) if self.cls_token is not None else None
        outs = []
        for layer, (s, e) in zip(self.interactions, self.interaction_indexes):
            x, c, cls = layer(x, c, cls, self.blocks[s:e + 1], inj, ext, gh, gw)
            outs.append(x.transpose(1, 2).reshape(b, -1, gh, gw))  # (B, H*W, D) -> (B, D, H, W)
        d = c.shape[-1]
        c2, c3, c4 = c.split([n2, n3, c.shape[1] - n2 - n3], dim=1)
        c2 = c2.transpose(1, 2).reshape(b, d, 2 * gh, 2 * gw)
        c3 = c3.transpose(1, 2).reshape(b, d, gh, gw)
        c4 = c4.transpose(1, 2).reshape(b, d, gh // 2, gw // 2)
        c1 = self.up(c2) + c1
        if self.add_vit_feature:
            x1, x2, x3, x4 = outs
            c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
            c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
            c3 = c3 + x3
            c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]


class ViTAdapter(AdapterMixin, VisionTransformer):
    """DeiT / AugReg ViT + adapter (upstream ViTAdapter(TIMMVisionTransformer))."""


class BEiTAdapter(AdapterMixin, BEiT):
    """BEiT + adapter (upstream BEiTAdapter(BEiT)): cls token carried between interactions."""


def _adapter_init(m):
    """Upstream's _init_weights on spm / interactions / up: Linear trunc_normal(.02), LN and BN 1/0,
    convs normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups."""
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


def build_backbone(args):
    adapter = dict(interaction_indexes=args.interaction_indexes, deform_heads=args.deform_heads,
                   deform_ratio=args.deform_ratio, init_values=args.init_values, n_points=args.n_points,
                   conv_inplane=args.conv_inplane, cffn_ratio=args.cffn_ratio, with_cp=args.with_cp)
    vit = dict(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, drop_path_rate=args.drop_path)
    if args.backbone == "beit":
        # BEiT's layer scales start at init_values too (upstream passes the adapter's init_values down)
        model = BEiTAdapter(img_size=args.crop, init_values=args.init_values, **vit)
    else:
        model = ViTAdapter(img_size=args.pretrain_size, **vit)
    model.add_adapter(**adapter)
    return model


def build_model(args, num_classes):
    backbone = build_backbone(args)
    d = args.embed_dim
    if args.head == "upernet":
        decode = UPerHead([d] * 4, args.head_channels, num_classes)
    else:  # argparse restricts the choices; Mask2Former slots in here
        raise UserError(f"--head {args.head}: unknown decode head")
    return EncoderDecoder(backbone, decode, FCNHead(d, 256, num_classes, in_index=2), aux_weight=0.4)


def summarize(model):
    vit_keys = ("backbone.patch_embed.", "backbone.pos_embed", "backbone.cls_token", "backbone.blocks.")
    return summary(model, {
        "backbone ViT": lambda n: n.startswith(vit_keys),
        "adapter (SPM, interactions, norms)": lambda n: n.startswith("backbone."),
        "decode head (UperNet)": lambda n: n.startswith("decode_head."),
        "auxiliary head (FCN)": lambda n: n.startswith("auxiliary_head."),
    })


# ----------------------------------------------------------------------------------------------------
# Checkpoints: pre-trained ViTs and the official segmentation checkpoints (spec 1.9, 2.3)





def read_segmentor_state(path):
    """The state dict of ours ({'model': ...}) or of an official mmseg checkpoint ({'meta', 'state_dict'}
    with backbone. / decode_head. / auxiliary_head. keys)."""
    ck = load_checkpoint(path, "--checkpoint")
    sd = strip_prefix(unwrap_state_dict(ck, ("model", "state_dict")), "module.")
    if not isinstance(sd, dict) or "decode_head.conv_seg.weight" not in sd:
        raise UserError(f"--checkpoint {path}: no segmentor weights (expected 'state_dict' or 'model' with "
                        "decode_head.conv_seg.weight); is it a ViT-Adapter segmentation checkpoint?")
    return sd


def load_segmentor_checkpoint(model, path):
    """Every key must match, BN's num_batches_tracked included (one readable block otherwise)."""
    return load_state_dict_checked(model, read_segmentor_state(path), f"--checkpoint {path}")


# ----------------------------------------------------------------------------------------------------
# Optimiser: AdamW with layer-wise lr decay, or AugReg-B's custom keys (spec 5.1, 5.2)

def layer_id(name, num_layers):
    """Upstream's get_num_layer_for_vit on the segmentor's names; num_layers = depth + 2."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed") or \
            name.startswith("backbone.patch_embed"):
        return 0
    # quirk kept: Mask2Former's query / prediction parameters share the embedding's (smallest) lr
    if name.startswith(tuple(f"decode_head.{k}" for k in ("mask_embed", "cls_embed", "level_embed",
                                                          "query_embed", "query_feat"))):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


def layer_decay_groups(model, weight_decay, rate, depth):
    """LayerDecayOptimizerConstructor: lr x rate^(depth + 1 - layer_id); weight decay 0 for 1-D
    parameters and '.bias' only (the pos_embed / cls_token exemption never fires upstream: kept so)."""
    num_layers = depth + 2
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim == 1 or name.endswith(".bias") else weight_decay
        lid = layer_id(name, num_layers)
        g = groups.setdefault((lid, wd), {"params": [], "names": [], "weight_decay": wd,
                                          "lr_scale": rate ** (num_layers - lid - 1)})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


AUGREG_B_KEYS = {"level_embed": dict(decay_mult=0.0), "pos_embed": dict(decay_mult=0.0),
                 "norm": dict(decay_mult=0.0), "bias": dict(decay_mult=0.0), "head": dict(lr_mult=10.0)}


def custom_key_groups(model, weight_decay, keys=AUGREG_B_KEYS):
    """mmcv DefaultOptimizerConstructor(custom_keys): the keys sorted by name then by length (longest
    first); the first key contained in a parameter's name sets its lr_mult / decay_mult."""
    order = sorted(sorted(keys), key=len, reverse=True)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in order if k in name), None)
        lr_mult = keys[key].get("lr_mult", 1.0) if key else 1.0
        wd = weight_decay * (keys[key].get("decay_mult", 1.0) if key else 1.0)
        g = groups.setdefault((lr_mult, wd), {"params": [], "names": [], "weight_decay": wd, "lr_scale": lr_mult})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(args, model):
    if args.custom_keys:
        groups = custom_key_groups(model, args.weight_decay)
    else:  # layer decay 0 (none): every scale is 1
        groups = layer_decay_groups(model, args.weight_decay, args.layer_decay or 1.0, args.depth)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    init_lr(opt, args.lr)
    return opt


# ----------------------------------------------------------------------------------------------------
# Data and inference (spec 5.3, 5.4)

def build_data(args, with_train=True):
    mean, std = args.norm
    train_tf = TrainTransform(scale=args.scale, crop=(args.crop, args.crop), mean=mean, std=std)
    # --ms-flip rescales the original image per ratio itself; single scale: keep-ratio resize + multiple of 32
    test_tf = TestTransform(scale=None if args.ms_flip else args.test_scale, size_divisor=None if args.ms_flip else 32,
                            mean=mean, std=std)
    if args.dataset == "synthetic":
        k = args.num_classes or 6
        n = args.num_samples or 64
        train = SyntheticSeg(n, k, size=(96, 96), split="train", transform=train_tf, seed=args.seed)
        val = SyntheticSeg(max(8, n // 4), k, size=(96, 96), split="val", transform=test_tf, seed=args.seed)
    else:
        train = build_dataset(args.dataset, args.data_root, "train", train_tf) if with_train else None
        val = build_dataset(args.dataset, args.data_root, "val", test_tf)
    return train, val


def ms_sizes(h, w, args):
    """Test sizes of the ratios 0.5..1.75. BEiT-640 (SETR_Resize): short side max(crop, r * short), the
    long side follows the aspect ratio (uncapped). Others: mmseg keep-ratio into r * test_scale, then up
    to a multiple of 32 (ResizeToMultiple)."""
    out = []
    for r in MS_RATIOS:
        scale = (int(args.test_scale[0] * r), int(args.test_scale[1] * r))
        if args.backbone == "beit":
            short = max(args.crop, min(scale))
            scale = (short * max(h, w) / min(h, w), short)
            out.append(rescale_size(h, w, scale))
        else:
            nh, nw = rescale_size(h, w, scale)
            out.append((math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32))
    return out


def infer(model, img, size, args, num_classes):
    """Class probabilities (1, K, H0, W0): slide (or whole) inference, single scale or --ms-flip (mean of
    the per-scale, per-flip softmaxes, flips undone)."""
    kw = dict(mode=args.eval_mode, crop=(args.crop, args.crop), stride=(args.stride, args.stride),
              pad_windows=args.backbone == "beit")  # BEiT's grid is fixed: pad windows smaller than the crop
    if not args.ms_flip:
        return predict(model, img, size, num_classes, **kw)
    probs = 0
    sizes = ms_sizes(*img.shape[-2:], args)
    for s in sizes:
        x = resize(img, s)
        probs = probs + predict(model, x, size, num_classes, **kw)
        probs = probs + predict(model, x.flip(-1), size, num_classes, **kw).flip(-1)
    return probs / (2 * len(sizes))






# ----------------------------------------------------------------------------------------------------
# Image demo (upstream image_demo.py): slide inference, colour overlay at the original resolution

def demo(args, model, num_classes, device):
    img = imread(args.demo)
    mean, std = args.norm
    tf = TestTransform(scale=None, mean=mean, std=std) if args.ms_flip else \
        TestTransform(scale=args.test_scale, size_divisor=32, mean=mean, std=std)
    x, _ = tf(img, np.zeros(img.shape[:2], dtype=np.uint8))
    model.eval()
    probs = infer(model, x[None].to(device), img.shape[:2], args, num_classes)
    pred = probs.argmax(1)[0].cpu().numpy()
    palette = get_palette(args.palette or DATASETS[args.dataset]["palette"], num_classes)
    out = os.path.join(args.work_dir, os.path.basename(args.demo))
    save_overlay(out, img, pred, palette, args.opacity)
    print(f"wrote {out}")
    return out, pred


# ----------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = get_args(argv)
    num_classes = (args.num_classes or 6) if args.dataset == "synthetic" else DATASETS[args.dataset]["num_classes"]
    if args.summary:
        with torch.device("meta"):
            model = build_model(args, num_classes)
        summarize(model)
        return None
    info = D.setup(args.device)
    result = run(args, info, num_classes)
    D.cleanup()
    return result


def run(args, info, num_classes):
    dev = info.device
    D.seed_everything(args.seed + info.rank)
    if args.demo or args.eval_only:
        ck_path = args.checkpoint or os.path.join(args.work_dir, "best.pt")
        sd = read_segmentor_state(ck_path)
        num_classes = sd["decode_head.conv_seg.weight"].shape[0]  # the checkpoint's, whatever the flags say
        model = build_model(args, num_classes)
        load_state_dict_checked(model, sd, f"--checkpoint {ck_path}")
        model.to(dev)
        if args.demo:
            return demo(args, model, num_classes, dev)
    else:
        model = build_model(args, num_classes)
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size
    if per_rank < 2 and not args.eval_only and not (info.distributed and dev.type == "cuda"):
        raise UserError(f"--batch-size {args.batch_size} gives {per_rank} image per process: BatchNorm cannot "
                        "train on one image (the PPM's 1x1 pooling); use 2 or more per process (SyncBN on GPUs "
                        "under torchrun pools them)")
    train_set, val_set = build_data(args, with_train=not args.eval_only)
    if not args.eval_only and len(train_set) == 0:
        raise UserError(f"--data-root {args.data_root}: the training split is empty")
    book = None if args.eval_only else RunBook(args, info)  # refuses a work dir holding a run unless --resume
    if not args.eval_only and not args.resume:
        if args.pretrained:
            # the plain ViT's keys only; the adapter keeps its init (upstream loads the ViT before it exists)
            model.backbone.load_pretrained(args.pretrained)
    model.to(dev)
    if info.distributed and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN as the configs (GPU only)

    opt = build_optimizer(args, model)
    use_amp = bool(args.amp) and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", init_scale=512.0, enabled=use_amp)  # mmcv fp16: dynamic, init 512
    if book is not None:
        ck = book.resume(model, opt)
        if ck and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])

    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=1, sampler=D.ShardSampler(len(val_set), info.rank, info.world_size),
        num_workers=min(args.workers, 2), collate_fn=collate_single)
    palette = get_palette(DATASETS[args.dataset]["palette"], num_classes)

    def run_eval(tag):
        vis = overlay_writer(os.path.join(args.work_dir, "vis", tag), val_set, palette, args.vis) \
            if info.is_main and args.vis else None
        fn = functools.partial(infer, args=args, num_classes=num_classes)
        return evaluate(D.unwrap(model), val_loader, num_classes, dev, fn, info.is_main, vis)

    if args.eval_only:
        m = run_eval("eval")
        if info.is_main:
            print(f"mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  aAcc {m['aAcc']:.2f}")
        return m

    start = book.start
    if info.is_main:
        if not args.pretrained and not args.resume and PRESETS[args.preset].pretrained:
            print(f"note: no --pretrained: the ViT starts from scratch (the config starts from "
                  f"{PRESETS[args.preset].pretrained})")
        print(f"{args.preset}: {count_params(model):,} parameters; {args.iters} iterations at batch "
              f"{args.batch_size} ({info.world_size} process(es) on {dev}{', fp16' if use_amp else ''})")
    log = book.log
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    loader = D.train_batches(train_set, per_rank, info, args.seed, start, args.workers)
    model.train()
    stop = min(args.iters, args.stop_at or args.iters)
    bar = tqdm(range(start, stop), initial=start, total=args.iters, disable=not info.is_main, desc=args.preset)
    t0 = time.time()
    for it in bar:
        D.seed_step(args.seed, it, info.rank)  # dropout / DropPath: exact on resume
        set_lr(opt, warmup_poly_mmcv(it, args.iters, args.warmup))
        batch = next(loader)
        img, label = pad_batch(batch["img"].to(dev), batch["label"].to(dev), (args.crop, args.crop))
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            loss, parts = model(img, label)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at iteration {it}; stopping without saving")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

        done = it + 1
        if info.is_main and (done % args.log_interval == 0 or done == stop):
            rec = {"iter": done, "loss": loss.item(), "lr": max(g["lr"] for g in opt.param_groups),
                   "sec_per_iter": (time.time() - t0) / (done - start)}
            rec.update({k: v.item() for k, v in parts.items()})
            log(**rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        evaluating = done % args.eval_interval == 0 or done == args.iters
        book.step_end(done, model, opt, save=done % args.ckpt_interval == 0 or done == stop,
                      evaluate=(lambda: run_eval(f"iter_{done}")) if evaluating else None,
                      extra=lambda: {"scaler": scaler.state_dict()})
    bar.close()
    book.finish()
    return book.last_metrics




if __name__ == "__main__":
    cli(main)
