"""ViT-Adapter (ICLR 2023) for semantic segmentation: a plain ViT + a spatial prior and injector /
extractor interactions by multi-scale deformable attention, with UperNet (+ FCN auxiliary head) or
Mask2Former (common/mask2former.py).

Chen, Duan, Wang, He, Lu, Dai, Qiao, "Vision Transformer Adapter for Dense Predictions". Official code:
github.com/czczup/ViT-Adapter (segmentation/, mmseg 0.20.2); this file follows it at fd64a51:
`mmseg_custom/models/backbones/{adapter_modules,vit_adapter,beit_adapter}.py`, the configs of
`segmentation/configs/{ade20k,cityscapes,coco_stuff10k,coco_stuff164k,pascal_context}/{upernet,mask2former}_*`,
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
    # Mask2Former, BEiT-L at 640 (8 GPUs x 2); the 896 configs run 16 GPUs x 1 from a COCO-Stuff-164k model:
    torchrun --nproc_per_node=8 vit_adapter_seg.py --preset ade20k_beit_large_mask2former \
        --data-root data/ade/ADEChallengeData2016 --pretrained pretrained/beit_large_patch16_224_pt22k_ft22k.pth
    torchrun --nproc_per_node=16 vit_adapter_seg.py --preset ade20k_beit_large_mask2former_896 \
        --data-root data/ade/ADEChallengeData2016 --pretrained pretrained/beit_large_patch16_224_pt22k_ft22k.pth \
        --load-from pretrained/mask2former_beit_adapter_large_896_80k_cocostuff164k.pth.tar
    # quick start on the CPU, no files (a small ViT-Adapter, a minute or two; Mask2Former: synthetic_mask2former):
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
- fp32 training everywhere: the DeiT / AugReg-T/B / light configs' `fp16 = dict(loss_scale=512)` is never
  read by mmseg 0.20.2's train_segmentor (spec 5.2 note); --amp (autocast + GradScaler(init 512), GPUs) is
  an opt-in speed switch. The official test.py does read it (wrap_fp16_model: the forward under fp16
  autocast), so --eval-amp is on for those presets' --eval-only and off for in-training evaluation;
- Mask2Former (spec 4.2; details in common/mask2former.py): no auxiliary head; the segmentor's softmax over
  the semantic scores before slide windows and augmentations are averaged is kept; the layer-decay quirk puts
  decode_head.{query_embed, query_feat, level_embed, cls_embed, mask_embed} at the embedding's (smallest) lr;
  --load-from loads a whole segmentor (the configs' load_from) and leaves a classifier of another class count
  at its init, as mmcv's strict=False does (ADE20K 896 from COCO-Stuff-164k). The Mapillary checkpoint of the
  Cityscapes config already has 19 classes: the official MapillaryHack maps Mapillary's 65 labels to
  Cityscapes' 19 in the Mapillary training pipeline, so nothing is mapped at load time. The BEiTv2 ADE 896
  config tests single scale with flip (--test-flip); the 896 multi-scale configs use 3 (4 for BEiTv2) keep-ratio
  scales up to 896 with PadShortSide, which is what padding BEiT's slide windows does here;
- BEiT has a fixed token grid: slide windows smaller than the crop are padded (pitfall 2 of the spec);
- --ms-flip: the ratios 0.5..1.75 + flip of the BEiT-640 configs (SETR_Resize there; mmseg keep-ratio
  scales + multiples of 32 for the others, which ship no multi-scale config); each scale is a bilinear
  resize of the normalised original image (mmseg resizes the uint8 image: rounding differs);
- one image per process trains BN on one image (the PPM's 1x1 pooling cannot): refused unless SyncBN
  (the 896 Mask2Former configs run 16 GPUs x 1 image with SyncBN).
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
from tqdm import tqdm

from common import dist as D
from common.deform_adapter import Extractor, Injector, SpatialPrior, adapter_init, reference_points
from common.io import (ArgumentParser, UserError, check_flags, cli, load_checkpoint, load_state_dict_checked,
                       strip_prefix, unwrap_state_dict, work_dir_problem)
from common.mask2former import Mask2FormerHead, Mask2FormerSegmentor
from common.palettes import PALETTES, class_names, get_palette, legend, save_image, save_overlay
from common.seg_data import (DATASETS, SyntheticSeg, TestTransform, TrainTransform, build_dataset, check_files,
                             imread, rescale_size)
from common.segment import (EncoderDecoder, collate_single, evaluate, overlay_writer, pad_batch, predict,
                            resize)
from common.train import RunBook, count_params, custom_key_groups, init_lr, set_lr, summary, warmup_poly_mmcv
from common.upernet import FCNHead, UPerHead
from common.vit import BEiT, SIZES, VisionTransformer
from ops import MSDeformAttn

# ----------------------------------------------------------------------------------------------------
# Presets: every row of the README tables, UperNet and Mask2Former (spec 1.8, 4.2, 5.2-5.4, 6), and the light
# DeiT-B config. Each value can be overridden on the command line.

IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
HALF = ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))  # AugReg-B/L configs
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# adapter size (spec 1.8): deform heads, value ratio, drop path, interaction indexes, injector gamma init
ADAPTER = {
    "tiny": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.1, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "small": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.2, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "base": dict(deform_heads=12, deform_ratio=0.5, drop_path=0.3, indexes=((0, 2), (3, 5), (6, 8), (9, 11))),
    "large": dict(deform_heads=16, deform_ratio=0.5, drop_path=0.4, indexes=((0, 5), (6, 11), (12, 17), (18, 23))),
}
# Mask2Former width / heads / encoder FFN / decoder FFN by backbone size (spec 4.2); 6 encoder, 9 decoder layers
M2F = {"base": dict(m2f_dim=256, m2f_heads=8, m2f_enc_ffn=1024, m2f_dec_ffn=2048),
       "large": dict(m2f_dim=1024, m2f_heads=32, m2f_enc_ffn=4096, m2f_dec_ffn=4096)}


@dataclass
class Preset:
    """One official config. Sizes come from ADAPTER / M2F / common.vit.SIZES unless overridden here."""
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
    head: str = "upernet"    # or 'mask2former'
    head_channels: int = 512  # UperNet
    num_queries: int = 100   # Mask2Former (200 for the 896 configs)
    norm: tuple = IMAGENET
    with_cp: bool = False
    eval_amp: bool = False   # the configs' `fp16` key: read by the official test.py only (fp16 autocast on GPUs)
    eval_interval: int = 16000  # ADE 160k: 16k; 80k configs 8k, 40k configs 4k, Cityscapes 1k (iterations)
    warmup: int = 1500          # linear warmup iterations (ratio 1e-6, mmcv style)
    ms_ratios: tuple = MS_RATIOS  # --ms-flip ratios of test_scale
    ms_setr: bool = None     # --ms-flip resize: SETR_Resize (None: for BEiT) or keep-ratio + multiple of 32
    test_flip: bool = False  # single-scale test averaged with its flip (the BEiTv2 ADE 896 config)
    with_cffn: bool = True   # the light DeiT-B config switches these three off
    use_extra_extractor: bool = True
    add_vit_feature: bool = True
    pretrained: str = ""     # the official pre-training file (for the user; never downloaded)
    load_from: str = ""      # the official load_from: a segmentation checkpoint this config fine-tunes
    overrides: dict = field(default_factory=dict)  # model dims for the small synthetic presets


_ADE = dict(dataset="ade20k", crop=512, scale=(2048, 512), test_scale=(2048, 512), stride=341, iters=160_000)
_80K = dict(iters=80_000, eval_interval=8000)
_40K = dict(iters=40_000, eval_interval=4000)
_DEIT = dict(backbone="vit", **_ADE, weight_decay=0.01, layer_decay=0.95, eval_amp=True)
_BEIT_L = dict(backbone="beit", size="large", lr=2e-5, weight_decay=0.05, layer_decay=0.90, drop_path=0.3,
               init_values=1e-6, head_channels=1024, with_cp=True,
               pretrained="beit_large_patch16_224_pt22k_ft22k.pth")
_BEIT_B = dict(backbone="beit", size="base", lr=3e-5, weight_decay=0.05, layer_decay=0.95, drop_path=0.2,
               init_values=1e-6, pretrained="beit_base_patch16_224_pt22k_ft22k.pth")
_M2F = dict(head="mask2former")
_BEITV2_L = "beitv2_large_patch16_224_pt1k_ft21k.pth"
_896 = dict(crop=896, scale=(3584, 896), test_scale=(3584, 896), stride=512, num_queries=200,
            ms_ratios=(640 / 896, 768 / 896, 1.0), ms_setr=False, **_80K)  # 16 GPUs x 1 image
_ADE_640 = dict(dataset="ade20k", crop=640, scale=(2048, 640), test_scale=(2048, 640), stride=426)
_C10K = dict(dataset="coco_stuff10k", crop=512, scale=(2048, 512), test_scale=(2048, 512), stride=341)
_PASCAL = dict(dataset="pascal_context59", crop=480, scale=(520, 520), test_scale=(4096, 520), stride=320)
PRESETS = {
    # UperNet + FCN auxiliary head. DeiT / AugReg-T/B configs say fp16 but train in fp32 (spec 5.2 note)
    "ade20k_deit_tiny": Preset(size="tiny", **_DEIT, lr=1.2e-4, pretrained="deit_tiny_patch16_224-a1311bcf.pth"),
    "ade20k_deit_small": Preset(size="small", **_DEIT, lr=6e-5, pretrained="deit_small_patch16_224-cd65a155.pth"),
    "ade20k_deit_base": Preset(size="base", **_DEIT, lr=6e-5, pretrained="deit_base_patch16_224-b5f2ef4d.pth"),
    # upernet_deit_adapter_light_base_512_160k_ade20k.py: one interaction over all 12 blocks, no ConvFFN, no
    # extra extractors, no ViT features added to the outputs (no result published)
    "ade20k_deit_light_base": Preset(size="base", **_DEIT, lr=6e-5, with_cffn=False, use_extra_extractor=False,
                                     add_vit_feature=False, overrides=dict(indexes=((0, 11),)),
                                     pretrained="deit_base_patch16_224-b5f2ef4d.pth"),
    "ade20k_augreg_tiny": Preset(size="tiny", **_DEIT, lr=1.2e-4,
                                 pretrained="Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-"
                                            "steps_20k-lr_0.03-res_224.pth"),
    "ade20k_augreg_base": Preset("vit", "base", **_ADE, lr=2e-5, weight_decay=0.01, custom_keys=True,
                                 pretrain_size=384, norm=HALF, eval_amp=True,
                                 pretrained="B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
                                            "steps_20k-lr_0.01-res_384.pth"),
    "ade20k_augreg_large": Preset("vit", "large", **_ADE, lr=2e-5, weight_decay=0.05, layer_decay=0.95,
                                  pretrain_size=384, norm=HALF, with_cp=True,
                                  pretrained="L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--"
                                             "imagenet2012-steps_20k-lr_0.01-res_384.pth"),
    "ade20k_beit_large": Preset(**_BEIT_L, **_ADE_640, iters=160_000),
    "coco_stuff10k_beit_large": Preset(**_BEIT_L, **_C10K, **_80K),
    "coco_stuff164k_beit_large": Preset(**_BEIT_L, dataset="coco_stuff164k", crop=640, scale=(2560, 640),
                                        test_scale=(2560, 640), stride=426, **_80K),
    "pascal_context59_beit_large": Preset(**_BEIT_L, **_PASCAL, **_80K),
    # Mask2Former (no auxiliary head)
    "ade20k_beit_large_mask2former": Preset(**_BEIT_L, **_M2F, **_ADE_640, iters=160_000),
    "ade20k_beit_large_mask2former_896": Preset(
        **_BEIT_L, **_M2F, dataset="ade20k", **_896,
        load_from="mask2former_beit_adapter_large_896_80k_cocostuff164k.pth.tar"),
    # its single-scale config tests with flip; its multi-scale one uses 4 scales, 800 to 896
    "ade20k_beitv2_large_mask2former_896": Preset(
        **{**_BEIT_L, "pretrained": _BEITV2_L}, **_M2F, dataset="ade20k",
        **{**_896, "ms_ratios": (800 / 896, 832 / 896, 864 / 896, 1.0)}, test_flip=True,
        load_from="mask2former_beitv2_adapter_large_896_80k_cocostuff164k.pth"),
    "coco_stuff10k_beit_base_mask2former": Preset(**_BEIT_B, **_M2F, **_C10K, **_40K),
    "coco_stuff10k_beit_large_mask2former": Preset(**_BEIT_L, **_M2F, **_C10K, **_40K),
    "coco_stuff164k_beit_large_mask2former_896": Preset(**_BEIT_L, **_M2F, dataset="coco_stuff164k", **_896),
    "coco_stuff164k_beitv2_large_mask2former_896": Preset(**{**_BEIT_L, "pretrained": _BEITV2_L}, **_M2F,
                                                          dataset="coco_stuff164k", **_896),
    "pascal_context59_beit_base_mask2former": Preset(**_BEIT_B, **_M2F, **_PASCAL, **_40K),
    "pascal_context59_beit_large_mask2former": Preset(**_BEIT_L, **_M2F, **_PASCAL, **_40K),
    # 80k from the Mapillary Mask2Former (trained on Mapillary labels mapped to Cityscapes' 19 classes by the
    # official MapillaryHack, so its classifier already has 19 + 1 outputs); evaluation every 1k iterations
    "cityscapes_beit_large_mask2former_896": Preset(
        **_BEIT_L, **_M2F, dataset="cityscapes", crop=896, scale=(2048, 1024), test_scale=(2048, 1024), stride=512,
        iters=80_000, eval_interval=1000, ms_ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
        load_from="mask2former_beit_adapter_large_896_80k_mapillary.pth.tar"),
    # no files: the quick start and the tests. A narrow 4-block ViT-Adapter on 96x96 images, 64x64 crops.
    "synthetic": Preset("vit", "tiny", dataset="synthetic", crop=64, scale=(96, 96), test_scale=(96, 96), stride=32,
                        iters=200, lr=1e-3, weight_decay=0.01, layer_decay=0.95, pretrain_size=64, head_channels=64,
                        eval_interval=200, warmup=20,
                        overrides=dict(embed_dim=64, depth=4, num_heads=2, deform_heads=4,
                                       indexes=((0, 0), (1, 1), (2, 2), (3, 3)))),
    # the same with a small Mask2Former: 64 wide, 2 encoder and 3 decoder layers, 16 queries, 1,024 points
    "synthetic_mask2former": Preset("vit", "tiny", dataset="synthetic", crop=64, scale=(96, 96), test_scale=(96, 96),
                                    stride=32, iters=200, lr=1e-3, weight_decay=0.01, layer_decay=0.95,
                                    pretrain_size=64, head="mask2former", num_queries=16, eval_interval=200,
                                    warmup=20,
                                    overrides=dict(embed_dim=64, depth=4, num_heads=2, deform_heads=4,
                                                   indexes=((0, 0), (1, 1), (2, 2), (3, 3)), m2f_dim=64,
                                                   m2f_heads=4, m2f_enc_ffn=128, m2f_dec_ffn=128, m2f_enc_layers=2,
                                                   m2f_dec_layers=3, mask_points=1024)),
}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--preset", default="synthetic", choices=sorted(PRESETS), help="an official config (README row)")
    a("--dataset", default=None, choices=sorted(DATASETS), help="dataset in its official layout (default: preset's)")
    a("--data-root", default=None, help="dataset root (not needed for synthetic)")
    a("--work-dir", default="work_dirs/vit_adapter", help="holds last.pt, best.pt, log.jsonl, vis/, demo outputs")
    a("--pretrained", default=None, help="ViT checkpoint: DeiT .pth, AugReg .pth (timm layout) or .npz, BEiT .pth")
    a("--head", default=None, choices=["upernet", "mask2former"], help="decode head (default: the preset's)")
    a("--load-from", default=None, help="segmentation checkpoint to start from (the configs' load_from; a classifier\n"
                                         "of another class count keeps its initialisation, as mmcv's strict=False)")
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
    a("--with-cffn", action=argparse.BooleanOptionalAction, default=None, help="ConvFFN in the extractors (light: off)")
    a("--extra-extractor", dest="use_extra_extractor", action=argparse.BooleanOptionalAction, default=None,
      help="two extra extractors after the last interaction (light: off)")
    a("--add-vit-feature", action=argparse.BooleanOptionalAction, default=None,
      help="add the resized ViT features to the 4 output maps (light: off)")
    a("--head-channels", type=int, default=None, help="UperNet channels (512; BEiT-L 1024); FCN aux: 256")
    # Mask2Former (defaults: the preset's; B configs 256 / 8 / 1024 / 2048, L 1024 / 32 / 4096 / 4096)
    a("--num-queries", type=int, default=None, help="Mask2Former queries (100; 896 configs 200)")
    a("--m2f-dim", type=int, default=None, help="Mask2Former width (B 256, L 1024)")
    a("--m2f-heads", type=int, default=None, help="Mask2Former attention heads (B 8, L 32)")
    a("--m2f-enc-ffn", type=int, default=None, help="pixel decoder FFN hidden (B 1024, L 4096)")
    a("--m2f-dec-ffn", type=int, default=None, help="transformer decoder FFN hidden (B 2048, L 4096)")
    a("--m2f-enc-layers", type=int, default=None, help="pixel decoder deformable encoder layers (6)")
    a("--m2f-dec-layers", type=int, default=None, help="transformer decoder layers (9): 1 + 9 predictions")
    a("--mask-points", type=int, default=None, help="points per mask for matching and mask losses (12544)")
    a("--oversample-ratio", type=float, default=3.0, help="uncertainty sampling: candidates / points (3)")
    a("--importance-ratio", type=float, default=0.75, help="uncertainty sampling: share of uncertain points (0.75)")
    a("--no-object-weight", type=float, default=0.1, help="class weight of no-object in the CE (0.1)")
    a("--with-cp", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing (L: on)")
    a("--amp", action=argparse.BooleanOptionalAction, default=False,
      help="train with fp16 autocast + GradScaler(init 512) on GPUs: a speed switch, off in every config\n"
           "(the DeiT / AugReg configs' fp16 key is never read by mmseg 0.20.2's training)")
    a("--eval-amp", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate under fp16 autocast on GPUs, as the official test.py does for the configs with an fp16\n"
           "key (DeiT, AugReg-T/B, light): on by default for their --eval-only, off for in-training evaluation")
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
    a("--ms-flip", action="store_true", help="multi-scale + flip test (0.5-1.75; the preset's ratios)")
    a("--test-flip", action=argparse.BooleanOptionalAction, default=None,
      help="single scale averaged with its flip (the BEiTv2 ADE 896 config)")
    a("--eval-interval", type=int, default=None, help="evaluate and keep the best every N iterations (16k / 8k / 4k / 1k)")
    a("--ckpt-interval", type=int, default=1000, help="write last.pt every N iterations")
    a("--log-interval", type=int, default=50, help="log the loss every N iterations")
    a("--num-classes", type=int, default=None, help="synthetic only: number of classes (default 6)")
    a("--num-samples", type=int, default=None, help="synthetic only: images per split")
    a("--workers", type=int, default=2, help="data-loading processes per training process")
    a("--seed", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--resume", action="store_true", help="continue exactly from work-dir/last.pt (same flags; --iters may grow)")
    a("--skip-data-check", action="store_true", help="do not check that every data file opens before training")
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
    ad = {**ADAPTER[pr.size], **M2F["large" if pr.size == "large" else "base"], "m2f_enc_layers": 6,
          "m2f_dec_layers": 9, "mask_points": 12544, **pr.overrides}
    dim, depth, heads = SIZES[pr.size]
    fill = dict(embed_dim=ad.get("embed_dim", dim), depth=ad.get("depth", depth), num_heads=ad.get("num_heads", heads),
                deform_heads=ad["deform_heads"], deform_ratio=ad["deform_ratio"],
                drop_path=pr.drop_path if pr.drop_path is not None else ad["drop_path"],
                init_values=pr.init_values, pretrain_size=pr.pretrain_size, head=pr.head,
                head_channels=pr.head_channels, num_queries=pr.num_queries, with_cp=pr.with_cp, iters=pr.iters,
                lr=pr.lr, weight_decay=pr.weight_decay, layer_decay=pr.layer_decay, custom_keys=pr.custom_keys,
                crop=pr.crop, scale=pr.scale, test_scale=pr.test_scale, stride=pr.stride,
                eval_interval=pr.eval_interval, warmup=pr.warmup, with_cffn=pr.with_cffn,
                use_extra_extractor=pr.use_extra_extractor, add_vit_feature=pr.add_vit_feature,
                eval_amp=pr.eval_amp and args.eval_only, test_flip=pr.test_flip,
                **{k: ad[k] for k in ("m2f_dim", "m2f_heads", "m2f_enc_ffn", "m2f_dec_ffn", "m2f_enc_layers",
                                      "m2f_dec_layers", "mask_points")})
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ms_ratios = pr.ms_ratios
    args.ms_setr = pr.backbone == "beit" if pr.ms_setr is None else pr.ms_setr
    if args.interaction_indexes is None:
        args.interaction_indexes = [list(ij) for ij in ad["indexes"]]
    else:
        ii = args.interaction_indexes
        if len(ii) % 2 or any(ii[k] > ii[k + 1] for k in range(0, len(ii), 2)):
            p.error("--interaction-indexes: pairs 'first last' of blocks, e.g. 0 2 3 5 6 8 9 11")
        args.interaction_indexes = [ii[k:k + 2] for k in range(0, len(ii), 2)]
    if args.interaction_indexes[-1][1] >= args.depth:
        p.error(f"--interaction-indexes reach block {args.interaction_indexes[-1][1]} of a {args.depth}-block ViT")
    validate(p, args)
    if args.crop % 32:
        p.error(f"--crop {args.crop}: ViT-Adapter needs sides that are multiples of 32")
    if args.head == "mask2former" and (args.m2f_dim % 32 or args.m2f_dim % args.m2f_heads):
        p.error(f"--m2f-dim {args.m2f_dim}: must be a multiple of 32 (GroupNorm(32)) and of --m2f-heads")
    args.backbone, args.size, args.norm = pr.backbone, pr.size, pr.norm
    args.scale, args.test_scale = tuple(args.scale), tuple(args.test_scale)
    if args.dataset != "synthetic" and not (args.summary or args.demo) and not args.data_root:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    return args


def validate(p, args):
    """Every flag a user can get wrong, refused with parser.error before any work."""
    check_flags(p, args, positive=("iters", "batch_size", "lr", "eval_interval", "ckpt_interval", "log_interval",
                                   "crop", "scale", "test_scale", "stride", "embed_dim", "depth", "num_heads",
                                   "deform_heads", "deform_ratio", "cffn_ratio", "n_points", "conv_inplane",
                                   "pretrain_size", "head_channels", "num_samples", "stop_at"),
                non_negative=("weight_decay", "warmup", "workers", "vis", "init_values", "layer_decay"),
                below_one=("drop_path",))
    if args.stride > args.crop:
        p.error(f"--stride {args.stride} is larger than the window --crop {args.crop}: pixels between windows "
                "would never be predicted")
    if not 0 <= args.opacity <= 1:
        p.error(f"--opacity {args.opacity}: expected a value in [0, 1]")
    if args.num_classes is not None and args.num_classes < 2:
        p.error(f"--num-classes {args.num_classes}: expected 2 or more")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.eval_only and args.resume:
        p.error("--eval-only evaluates --checkpoint; it does not go with --resume")
    for flag in ("pretrained", "checkpoint", "demo"):
        path = getattr(args, flag)
        if path and not args.summary and not os.path.isfile(path):
            p.error(f"--{flag} {path}: file not found")
    if not args.summary:
        problem = work_dir_problem(args.work_dir)
        if problem:
            p.error(f"--work-dir {args.work_dir}: {problem}")


# ----------------------------------------------------------------------------------------------------
# Model: spatial prior module, injector, extractor with ConvFFN, interactions (spec 1.1-1.7)

class SpatialPriorModule(SpatialPrior):
    """A ResNet-like stem and three stride-2 convs: c1 (stride 4, a map) and c2..c4 (strides 8/16/32, as
    token lists), each projected to the ViT width by a 1x1 conv with bias."""

    def __init__(self, inplanes=64, embed_dim=384):
        super().__init__(inplanes, embed_dim, pool_stride=2, levels=4)

    def forward(self, img):
        c1, c2, c3, c4 = self.maps(img)
        # (B, D, h, w) -> (B, h*w, D) for the strides 8, 16, 32 (row-major tokens)
        return (self.fc1(c1), self.fc2(c2).flatten(2).transpose(1, 2), self.fc3(c3).flatten(2).transpose(1, 2),
                self.fc4(c4).flatten(2).transpose(1, 2))


def deform_inputs(h, w, device):
    """(reference points, spatial shapes, level starts) of the injector (queries: the 1/16 ViT grid, keys:
    SPM levels 1/8, 1/16, 1/32) and of the extractor (queries: all SPM tokens, keys: the 1/16 ViT grid)."""
    levels = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    shapes = torch.as_tensor(levels, dtype=torch.long, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    inj = (reference_points(levels[1:2], device), shapes, starts)
    ext = (reference_points(levels, device), shapes[1:2], shapes.new_zeros(1))
    return inj, ext


def _maybe_cp(enabled, fn, *args):
    """torch.utils.checkpoint when asked and gradients flow (upstream: with_cp and x.requires_grad)."""
    if enabled and torch.is_grad_enabled() and any(a.requires_grad for a in args if torch.is_tensor(a)):
        return cp.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class InteractionBlock(nn.Module):
    """injector -> ViT blocks [s..e] -> extractor (-> 2 extra extractors in the last interaction). With a
    cls token (BEiT) the injector and extractor see patch tokens only; cls joins the blocks."""

    def __init__(self, dim, heads, n_points, ratio, init_values, with_cffn, cffn_ratio, drop_path, extra, with_cp):
        super().__init__()
        self.with_cp = with_cp
        self.injector = Injector(dim, heads, n_points, ratio, init_values)
        self.extractor = Extractor(dim, heads, n_points, ratio, cffn_ratio, drop_path, with_cffn)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, heads, n_points, ratio, cffn_ratio, drop_path, with_cffn) for _ in range(2)) \
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
            m.apply(adapter_init)
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
        # a copy, not a view: a view of a parameter taken under no_grad "requires grad" without a grad_fn, which
        # module hooks (FlopCounterMode's tracker, in bench/) cannot handle
        cls = self.cls_token.repeat(b, 1, 1) if self.cls_token is not None else None
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


def build_backbone(args):
    adapter = dict(interaction_indexes=args.interaction_indexes, deform_heads=args.deform_heads,
                   deform_ratio=args.deform_ratio, init_values=args.init_values, n_points=args.n_points,
                   conv_inplane=args.conv_inplane, cffn_ratio=args.cffn_ratio, with_cffn=args.with_cffn,
                   add_vit_feature=args.add_vit_feature, use_extra_extractor=args.use_extra_extractor,
                   with_cp=args.with_cp)
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
    if args.head == "mask2former":  # EncoderDecoderMask2Former: no auxiliary head
        head = Mask2FormerHead([d] * 4, num_classes, args.m2f_dim, args.num_queries, args.m2f_heads,
                               args.m2f_enc_ffn, args.m2f_dec_ffn, args.m2f_enc_layers, args.m2f_dec_layers,
                               num_points=args.mask_points, oversample_ratio=args.oversample_ratio,
                               importance_ratio=args.importance_ratio, no_object_weight=args.no_object_weight,
                               with_cp=args.with_cp)
        return Mask2FormerSegmentor(backbone, head)
    decode = UPerHead([d] * 4, args.head_channels, num_classes)
    return EncoderDecoder(backbone, decode, FCNHead(d, 256, num_classes, in_index=2), aux_weight=0.4)


def summarize(model):
    vit_keys = ("backbone.patch_embed.", "backbone.pos_embed", "backbone.cls_token", "backbone.blocks.")
    m2f = isinstance(model, Mask2FormerSegmentor)
    return summary(model, {
        "backbone ViT": lambda n: n.startswith(vit_keys),
        "adapter (SPM, interactions, norms)": lambda n: n.startswith("backbone."),
        "Mask2Former pixel decoder": lambda n: n.startswith("decode_head.pixel_decoder."),
        "Mask2Former transformer decoder": lambda n: n.startswith("decode_head.transformer_decoder."),
        f"decode head ({'Mask2Former queries, predictions' if m2f else 'UperNet'})":
            lambda n: n.startswith("decode_head."),
        "auxiliary head (FCN)": lambda n: n.startswith("auxiliary_head."),
    })


# ----------------------------------------------------------------------------------------------------
# Checkpoints: pre-trained ViTs and the official segmentation checkpoints (spec 1.9, 2.3)





CLASSIFIERS = {"decode_head.conv_seg.weight": 0, "decode_head.cls_embed.weight": 1}  # key: extra rows (no-object)


def read_segmentor_state(path, flag="--checkpoint"):
    """The state dict of ours ({'model': ...}) or of an official mmseg checkpoint ({'meta', 'state_dict'}
    with backbone. / decode_head. / auxiliary_head. keys), UperNet or Mask2Former."""
    ck = load_checkpoint(path, flag)
    sd = strip_prefix(unwrap_state_dict(ck, ("model", "state_dict")), "module.")
    if not isinstance(sd, dict) or not any(k in sd for k in CLASSIFIERS):
        raise UserError(f"{flag} {path}: no segmentor weights (expected 'state_dict' or 'model' with "
                        "decode_head.conv_seg.weight (UperNet) or decode_head.cls_embed.weight (Mask2Former)); "
                        "is it a ViT-Adapter segmentation checkpoint?")
    return sd


def checkpoint_classes(sd):
    """(head, number of classes) of a segmentor state dict."""
    key = next(k for k in CLASSIFIERS if k in sd)
    return ("upernet" if "conv_seg" in key else "mask2former"), sd[key].shape[0] - CLASSIFIERS[key]


def load_segmentor_checkpoint(model, path):
    """Every key must match, BN's num_batches_tracked included (one readable block otherwise)."""
    return load_state_dict_checked(model, read_segmentor_state(path), f"--checkpoint {path}")


def load_from(model, path):
    """The configs' load_from: a whole segmentor checkpoint to fine-tune from. Every key must fit, except the
    class-dependent ones when the checkpoint has another number of classes (ADE20K 896 starts from a
    COCO-Stuff-164k model): those keep their initialisation, as mmcv's load_checkpoint(strict=False) skips
    mis-shaped keys. Returns the names left at their initialisation."""
    sd = read_segmentor_state(path, "--load-from")
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape and
               k.startswith(("decode_head.cls_embed.", "decode_head.conv_seg.", "auxiliary_head.conv_seg."))]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    load_state_dict_checked(model, sd, f"--load-from {path}", allow_missing=tuple(skipped))
    return skipped


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


def build_optimizer(args, model):
    if args.custom_keys:
        groups = custom_key_groups(model, args.weight_decay, AUGREG_B_KEYS)
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
    """Test sizes of the preset's ratios (0.5..1.75 by default). SETR_Resize (BEiT configs but the 896
    Mask2Former ones): short side max(crop, r * short), the long side follows the aspect ratio (uncapped).
    Others: mmseg keep-ratio into r * test_scale, then up to a multiple of 32 (ResizeToMultiple); the 896
    configs' PadShortSide(896) is what slide inference's window padding does."""
    out = []
    for r in args.ms_ratios:
        scale = (int(args.test_scale[0] * r), int(args.test_scale[1] * r))  # mmseg MultiScaleFlipAug's int()
        if args.ms_setr:
            short = max(args.crop, min(scale))
            scale = (short * max(h, w) / min(h, w), short)
            out.append(rescale_size(h, w, scale))
        else:
            nh, nw = rescale_size(h, w, scale)
            out.append((math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32))
    return out


def infer(model, img, size, args, num_classes):
    """Class probabilities (1, K, H0, W0): slide (or whole) inference, single scale (--test-flip: and its
    flip) or --ms-flip: the mean of the per-scale, per-flip softmaxes, flips undone. For Mask2Former the
    model's output is its semantic score map, which gets the same softmax (the official segmentor's)."""
    kw = dict(mode=args.eval_mode, crop=(args.crop, args.crop), stride=(args.stride, args.stride),
              pad_windows=args.backbone == "beit")  # BEiT's grid is fixed: pad windows smaller than the crop
    if not args.ms_flip:
        probs = predict(model, img, size, num_classes, **kw)
        if args.test_flip:
            probs = (probs + predict(model, img.flip(-1), size, num_classes, **kw).flip(-1)) / 2
        return probs
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
    palette_name = args.palette or DATASETS[args.dataset]["palette"]
    palette = get_palette(palette_name, num_classes)
    out = os.path.join(args.work_dir, os.path.basename(args.demo))
    stem, ext = os.path.splitext(out)
    if os.path.exists(out) and os.path.samefile(out, args.demo):  # --work-dir is the photo's folder
        out = f"{stem}_seg{ext}"
    save_overlay(out, img, pred, palette, args.opacity)
    key = legend(np.unique(pred).tolist(), palette, class_names(palette_name, num_classes), max(img.shape[1], 320))
    save_image(f"{os.path.splitext(out)[0]}_legend.png", key)
    print(f"wrote {out} and its legend {os.path.splitext(out)[0]}_legend.png")
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
    # refuses a work dir holding a run unless --resume, locks it, checks a resume's flags: before any work
    book = None if (args.eval_only or args.demo) else RunBook(args, info)
    if args.demo or args.eval_only:
        ck_path = args.checkpoint or os.path.join(args.work_dir, "best.pt")
        sd = read_segmentor_state(ck_path)
        head, num_classes = checkpoint_classes(sd)  # the checkpoint's classes, whatever the flags say
        if head != args.head:
            raise UserError(f"--checkpoint {ck_path} holds a {head} head, the model has a {args.head} head: pass "
                            f"--head {head} (and that head's preset)")
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
    if per_rank < 2 and args.head == "upernet" and not args.eval_only and not (info.distributed and dev.type == "cuda"):
        raise UserError(f"--batch-size {args.batch_size} gives {per_rank} image per process: BatchNorm cannot "
                        "train on one image (the PPM's 1x1 pooling); use 2 or more per process (SyncBN on GPUs "
                        "under torchrun pools them)")
    train_set, val_set = build_data(args, with_train=not args.eval_only)
    if not args.eval_only and len(train_set) == 0:
        raise UserError(f"--data-root {args.data_root}: the training split is empty")
    if not args.skip_data_check:
        check_files([train_set, val_set], info)
    if not args.eval_only and not args.resume:
        if args.pretrained:
            # the plain ViT's keys only; the adapter keeps its init (upstream loads the ViT before it exists)
            model.backbone.load_pretrained(args.pretrained)
        if args.load_from:  # after --pretrained, as mmseg: load_from replaces the weights that it holds
            skipped = load_from(model, args.load_from)
            if skipped and info.is_main:
                print(f"--load-from {args.load_from}: another number of classes, kept the initialisation of "
                      f"{', '.join(skipped)}")
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

    val_loader = D.data_loader(val_set, min(args.workers, 2), batch_size=1, collate_fn=collate_single,
                               sampler=D.ShardSampler(len(val_set), info.rank, info.world_size))
    palette = get_palette(DATASETS[args.dataset]["palette"], num_classes)

    names = class_names(DATASETS[args.dataset]["palette"], num_classes)

    def run_eval(tag):
        vis = overlay_writer(os.path.join(args.work_dir, "vis", tag), val_set, palette, args.vis, names) \
            if info.is_main and args.vis else None
        fn = functools.partial(infer, args=args, num_classes=num_classes)
        # --eval-amp: the official test.py's wrap_fp16_model, i.e. the forward under fp16 autocast (GPU only)
        with torch.autocast("cuda", dtype=torch.float16, enabled=bool(args.eval_amp) and dev.type == "cuda"):
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
        if not args.load_from and not args.resume and PRESETS[args.preset].load_from:
            print(f"note: no --load-from: the config fine-tunes {PRESETS[args.preset].load_from}")
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
