"""Uni-UVPT (NeurIPS 2023): visual prompt tuning for source-free domain adaptive semantic segmentation.

Ma, Wang, Liu, Guo, Wang, "When Visual Prompt Tuning Meets Source-Free Domain Adaptive Semantic
Segmentation". Official code: github.com/huawei-noah/noah-research, folder uni-uvpt/ (mmseg 0.30):
`mmseg_custom/models/backbones/{adapter_modules,swin_prompt,mix_transformer_prompt}.py`,
`models/segmentors/encoder_decoder_prompt.py`, `models/losses/{JSD_loss,GtA_losses}.py`,
`core/hook/online_pseudo_update_hook.py`, `configs/**`, `launcher_*.py`. Spec: shared/papers/uni_uvpt.md,
corrected by shared/papers/audit_atp_uni_uvpt.md (section B). A frozen source model (Swin-B or MiT-B5 +
DAFormer head) gets a prompt adapter between its stages and is self-trained on the target alone.

    # 1. source model (Standard Single Source): Swin-B from ImageNet on GTA5, evaluated on Cityscapes val
    python uni_uvpt.py --stage source --preset gta2cs --backbone swin_b --source-root data/gta \
        --target-root data/cityscapes --pretrained pretrained/swin_base_patch4_window7_224_20220317-e9b98025.pth \
        --work-dir work_dirs/gta_swin_source
    # 2. offline pseudo labels of the Cityscapes train split (source data never read from here on)
    python uni_uvpt.py --stage pseudo --preset gta2cs --backbone swin_b --target-root data/cityscapes \
        --source-checkpoint work_dirs/gta_swin_source/best.pt --pseudo-dir work_dirs/gta_swin_pseudo
    # 3. adaptation: prompt adapter + head + scale logits on the target, the backbone frozen
    python uni_uvpt.py --stage adapt --preset gta2cs --backbone swin_b --target-root data/cityscapes \
        --source-checkpoint work_dirs/gta_swin_source/best.pt --pseudo-dir work_dirs/gta_swin_pseudo \
        --work-dir work_dirs/gta_swin_uvpt
    # the published source models (SSS_*.pth, GtA_*.pth) serve as --source-checkpoint as they are;
    # evaluate a published adapted model:
    python uni_uvpt.py --stage adapt --preset syn2cs --backbone mit_b5 --target-root data/cityscapes \
        --eval-only --checkpoint GtA_MiT-B5_Synthia_Cityscapes_Uni-UVPT_LP_53.8_60.1.pth
    # quick start without files (toy Swin, the synthetic domain pair): see the README
    # several processes: torchrun --nproc_per_node=N uni_uvpt.py ... (the global batch is split over them)

Choices where the release is broken, silent or odd (spec section 9, audit B.2 / B.4), each followed here:
- the backbone is frozen, as the paper says (the launcher trains it: --unfreeze-backbone); its stochastic
  depth stays active (the model trains in train mode); SPM's conv4 is computed and unused; MiT owns a
  level embedding that it never adds; next-stage prompts come from a stage's input prompts, not from the
  extractor's output; the prompt-feature consistency clamps raw features to (0, 1), with equal weights;
- the prediction-consistency mask is computed per image (the code's max also runs over the batch, which
  is the same at its batch size 1);
- the entropy is normalised by log K (the code's 2.9444 = log 19);
- MSDeformAttn is ViT-Adapter's (value ratio 0.5), from ops/ (the release installs the wrong repository);
- the correction hook gets the full label map (at the resized 1024x512 frame), the crop box and the flip
  from the data pipeline (the release reads metadata nothing produces); it starts once an epoch has
  passed (an epoch = ceil(images / global batch) iterations); the curve fit skips classes with a NaN or
  fewer than 4 points; predictions are stored as uint8, confidences as fp16 (the thresholds are the fp16
  values); with several processes every process keeps the whole state, fed the whole global batch;
- pseudo labels are written into and read from one folder (--pseudo-dir; the release: pretrain2/ vs
  pretrain/), which must hold exactly the target train split's labels;
- the quantile is the launcher's 0.80 (train.py's default 0.66), 80k iterations at batch 1 (train.py's
  defaults, not the configs'), adaptation lr 6e-6 (Swin) / 4e-6 (MiT) from the launcher;
- checkpoints are selected on the target val split every 2000 iterations (save_best, as the release);
- Source-GtA training (six heads, seven augmentations with external assets) is not implemented: its
  published models load, their decode_head_aug0..5 dropped.
Multi-process runs (the official ones used one GPU): the processes start from rank 0's weights, average
their gradients by hand (the three-scale objective is not DDP's one forward / one backward) and take
rank 0's BatchNorm statistics after every step, as DDP's broadcast_buffers.
"""
import argparse
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import dist as D
from common.daformer import DAFormerHead
from common.deform_adapter import Extractor, Injector, SpatialPrior, adapter_init, pyramid, reference_points
from common.io import (ArgumentParser, UserError, check_flags, cli, load_checkpoint, load_state_dict_checked,
                       unwrap_state_dict)
from common.metrics import SYNTHIA13, SYNTHIA16, SegMetric, subset_miou
from common.mit import MIT_SIZES, MixVisionTransformer, load_mit_pretrained
from common.palettes import get_palette
from common.seg_data import (DATASETS, SyntheticSeg, TestTransform, TrainTransform, apply_transform,
                             build_dataset, read_label, resize_nearest)
from common.segment import EncoderDecoder, collate_single, evaluate, overlay_writer, predict
from common.swin import SWIN_SIZES, SwinTransformer, load_swin_pretrained
from common.train import (RunBook, count_params, custom_key_groups, freeze_all_but, init_lr, set_lr, summary,
                          warmup_cosine, warmup_poly_mmcv)
from ops import MSDeformAttn

IGNORE = 255

# ----------------------------------------------------------------------------------------------------
# Presets (spec 5, 6; the launchers' values). Every value can be overridden by a flag.

# backbone name -> constructor sizes and the settings that go with it (spec 2.1, 2.3, audit B.3)
BACKBONES = {
    "swin_b": dict(kind="swin", arch=dict(SWIN_SIZES["base"], window_size=7), drop_path=0.3),
    "mit_b5": dict(kind="mit", arch=dict(MIT_SIZES["mit_b5"]), drop_path=0.1),
    # the quick start and the tests: 4-block backbones 16..128 wide, a 2-head adapter, a narrow head
    "swin_toy": dict(kind="swin", arch=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
                     drop_path=0.1, deform_heads=2, conv_inplane=8, head_channels=32),
    "mit_toy": dict(kind="mit", arch=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                          sr_ratios=(4, 2, 1, 1)), drop_path=0.1, deform_heads=2, conv_inplane=8,
                    head_channels=32),
}
CITYSCAPES = dict(target="cityscapes", target_scale=(1024, 512), test_scale=(1024, 512), num_classes=19, crop=512)
PRESETS = {
    # source training lrs per backbone: configs/pretrain/daformer_*_400k_<lr>_*.py
    "gta2cs": dict(CITYSCAPES, source="gta5", source_scale=(1280, 720), source_lr=dict(swin_b=6e-6, mit_b5=2e-5)),
    "syn2cs": dict(CITYSCAPES, source="synthia", source_scale=(1280, 760), source_lr=dict(swin_b=2e-6, mit_b5=2e-6),
                   subsets=True),
    # no files: SyntheticSeg's source and target domains, 128x128 images, 6 classes, toy backbones
    "synthetic": dict(source="synthetic", target="synthetic", source_scale=(128, 128), target_scale=(128, 128),
                      test_scale=(128, 128), num_classes=6, crop=128, backbone="swin_toy",
                      source_lr=1e-3, adapt_lr=2e-4, source_iters=900, adapt_iters=50, warmup=30,
                      source_batch=8, adapt_batch=4, eval_interval=dict(source=50, adapt=25), curve_interval=5,
                      queue=20),
}
RECIPE = dict(  # the official values where a preset says nothing else
    backbone="swin_b", source_iters=400_000, warmup=1500, source_batch=2, adapt_iters=80_000, adapt_batch=1,
    adapt_lr=dict(swin_b=6e-6, mit_b5=4e-6), eval_interval=2000, curve_interval=200, queue=1000)
STAGES = ("source", "pseudo", "adapt")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", required=True, choices=STAGES, help="source: train on the source; pseudo: offline pseudo labels of "
      "the target train split; adapt: prompt tuning on the target (source-free)")
    a("--preset", default="gta2cs", choices=sorted(PRESETS), help="benchmark: source -> target")
    a("--backbone", default=None, choices=sorted(BACKBONES),
      help="frozen backbone (the preset's: swin_b; synthetic: swin_toy)")
    a("--source-root", default=None, help="--stage source: the source dataset (GTA5 / SYNTHIA layout)")
    a("--target-root", default=None, help="the target dataset (Cityscapes layout); train images unlabelled")
    a("--work-dir", default="work_dirs/uni_uvpt", help="holds last.pt, best.pt, log.jsonl and vis/")
    a("--pretrained", default=None, help="--stage source: ImageNet backbone (Swin: Microsoft / mmseg; MiT: mit_b5.pth)")
    a("--source-checkpoint", default=None, help="--stage pseudo / adapt: the source model (ours, or an official "
      "SSS / Source-GtA .pth)")
    a("--pseudo-dir", default=None, help="pseudo labels: written by --stage pseudo, read by --stage adapt")
    a("--eval-pseudo", action="store_true", help="--stage pseudo: also score the pseudo labels against the target "
      "train split's ground truth (an evaluation: reads those labels)")
    a("--unfreeze-backbone", action="store_true", help="train the backbone too, as the official launcher does")
    a("--no-update-pseudo", action="store_true", help="no online pseudo-label correction (ablation)")
    # model
    a("--drop-path", type=float, default=None, help="backbone stochastic depth (Swin-B 0.3, MiT-B5 0.1); also the "
      "extractors' DropPath")
    a("--deform-heads", type=int, default=None, help="MSDeformAttn heads (16)")
    a("--deform-ratio", type=float, default=0.5, help="MSDeformAttn value width / width (0.5)")
    a("--n-points", type=int, default=4, help="sampling points per head and level (4)")
    a("--conv-inplane", type=int, default=None, help="prompt generator width (64)")
    a("--init-values", type=float, default=1e-6, help="injector gamma init (1e-6)")
    a("--head-channels", type=int, default=None, help="DAFormer head embed / channels (256)")
    # schedule
    a("--iters", type=int, default=None, help="iterations (source 400k, adapt 80k)")
    a("--batch-size", type=int, default=None, help="global batch over all processes (source 2, adapt 1)")
    a("--lr", type=float, default=None, help="AdamW base lr (source: per backbone and source; adapt: Swin 6e-6, "
      "MiT 4e-6; adapter x5, head x10)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01; norms 0)")
    a("--warmup", type=int, default=None, help="--stage source: linear warmup iterations (1500)")
    a("--crop", type=int, default=None, help="training crop (512); a multiple of 128 for the half-scale forward")
    a("--scale", type=int, nargs=2, default=None, help="training keep-ratio resize, long short (GTA5 1280 720, "
      "SYNTHIA 1280 760, target 1024 512)")
    a("--test-scale", type=int, nargs=2, default=None, help="test keep-ratio resize, long short (1024 512)")
    # target objective and correction (spec 3, 4; launcher values)
    a("--pc-weight", type=float, default=1.0, help="prediction consistency weight (1.0)")
    a("--fc-weight", type=float, default=0.001, help="prompt-feature consistency weight per stage (0.001)")
    a("--mask-threshold", type=float, default=0.8, help="prediction consistency mask threshold (0.8)")
    a("--curve-interval", type=int, default=None, help="IoU curve point every N iterations (200)")
    a("--queue", type=int, default=None, help="crops in the IoU FIFO (1000)")
    a("--slope-threshold", type=float, default=0.95, help="relative slope change that starts a class (0.95)")
    a("--quantile", type=float, default=0.8, help="confidence quantile of the corrected labels (launcher 0.80)")
    # run
    a("--eval-interval", type=int, default=None, help="evaluate on the target val split every N iterations (2000)")
    a("--ckpt-interval", type=int, default=2000, help="write last.pt every N iterations")
    a("--log-interval", type=int, default=50)
    a("--num-samples", type=int, default=None, help="synthetic only: images of the training splits (64; val: half)")
    a("--workers", type=int, default=2, help="data-loading processes per training process")
    a("--seed", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--resume", action="store_true", help="continue exactly from work-dir/last.pt (the correction state too)")
    a("--eval-only", action="store_true", help="evaluate --checkpoint on the target val split and exit")
    a("--checkpoint", default=None, help="with --eval-only: ours or an official Uni-UVPT (adapt) / source .pth")
    a("--summary", action="store_true", help="print parameter counts per module group and exit (no data)")
    a("--vis", type=int, default=8, help="colour overlays written to work-dir/vis per evaluation")
    a("--stop-at", type=int, default=None, help="stop after this iteration as if interrupted (tests --resume)")
    args = p.parse_args(argv)
    pr = {**RECIPE, **PRESETS[args.preset]}
    args.backbone = args.backbone or pr["backbone"]
    bb = BACKBONES[args.backbone]
    source = args.stage == "source"
    stage = "source" if source else "adapt"  # --stage pseudo takes the adaptation's values (it uses few)
    fill = dict(drop_path=bb["drop_path"], deform_heads=bb.get("deform_heads", 16),
                conv_inplane=bb.get("conv_inplane", 64), head_channels=bb.get("head_channels", 256),
                iters=pr[f"{stage}_iters"], batch_size=pr[f"{stage}_batch"],
                lr=_for_backbone(pr[f"{stage}_lr"], args.backbone), warmup=pr["warmup"], crop=pr["crop"],
                scale=pr["source_scale" if source else "target_scale"], test_scale=pr["test_scale"],
                eval_interval=_per_stage(pr["eval_interval"], stage), curve_interval=pr["curve_interval"],
                queue=pr["queue"])
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.scale, args.test_scale = tuple(args.scale), tuple(args.test_scale)
    check_flags(p, args, positive=("iters", "batch_size", "crop", "eval_interval", "ckpt_interval", "log_interval",
                                   "curve_interval", "queue", "deform_heads", "conv_inplane", "head_channels", "lr"))
    if args.crop % 128 and args.stage == "adapt":
        p.error(f"--crop {args.crop}: the adapter needs sides that are multiples of 64 at every scale, and the "
                "target objective also runs the crop at half size: use a multiple of 128 (the paper: 512)")
    if not 0 < args.quantile < 1:
        p.error(f"--quantile {args.quantile}: expected a value in (0, 1)")
    if args.summary:
        return args
    synthetic = args.preset == "synthetic"
    if source and not args.eval_only and not synthetic and not args.source_root:
        p.error(f"--stage source needs --source-root (the {pr['source']} folder)")
    if not synthetic and not args.target_root:
        p.error(f"--target-root is required (the {pr['target']} folder)")
    if not source and not args.eval_only and not args.resume and not args.source_checkpoint:
        p.error(f"--stage {args.stage} needs --source-checkpoint (the source model: --stage source's best.pt / "
                "last.pt, or an official SSS / GtA file)")
    if not source and not args.eval_only and not args.pseudo_dir:
        p.error(f"--stage {args.stage} needs --pseudo-dir (where --stage pseudo writes and --stage adapt reads)")
    return args


def _per_stage(value, stage):
    return value[stage] if isinstance(value, dict) else value


def _for_backbone(value, backbone):
    """A preset value given per backbone ({'swin_b': .., 'mit_b5': ..}) or for all; a toy backbone takes the
    value of its kind."""
    if not isinstance(value, dict):
        return value
    return value.get(backbone, value["swin_b" if BACKBONES[backbone]["kind"] == "swin" else "mit_b5"])

# ----------------------------------------------------------------------------------------------------
# Model: the prompt adapter (spec 2.3). SPM = "prompt generator", interactions = "prompt interactors".
# Injector, Extractor and ConvFFN are ViT-Adapter's modules unchanged (same names, same keys).

class SpatialPriorModule(SpatialPrior):
    """ViT-Adapter's stem with a stride-1 max-pool: prompts at strides 2 / 4 / 8 of the image (c1..c3),
    each projected to the stage-0 width by a 1x1 conv with bias. conv4 (stride 16) is computed and its
    output discarded, as in the official code (0.59M parameters that never get a gradient)."""

    def __init__(self, inplanes=64, embed_dim=128):
        super().__init__(inplanes, embed_dim, pool_stride=1, levels=3)

    def forward(self, img):
        c1, c2, c3, _ = self.maps(img)  # strides 2, 4, 8; conv4 runs (BN statistics move), official quirk
        # (B, D, h, w) -> (B, h*w, D)
        return [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc1, c1), (self.fc2, c2), (self.fc3, c3))]


def deform_inputs(h, w, device):
    """(reference points, spatial shapes, level starts) for a stage whose tokens form an (h, w) grid:
    the injector's queries are the tokens and its 3 value levels the prompt grids (2h, 2w), (h, w),
    (h/2, w/2); the extractor's queries are all prompt tokens and its one value level the token grid."""
    grids = pyramid(h, w)
    shapes = torch.as_tensor(grids, dtype=torch.long, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    inj = (reference_points([(h, w)], device), shapes, starts)
    ext = (reference_points(grids, device), shapes[1:2], shapes.new_zeros(1))
    return inj, ext


class PromptInteraction(nn.Module):
    """One prompt interactor per stage: extractor, then injector (ViT-Adapter: injector, blocks, extractor),
    then three stride-2 convs (up_layer1..3, no bias) that turn this stage's INPUT prompts into the next
    stage's. The extractor's output only feeds the injector (official code; spec 2.3 step 4)."""

    def __init__(self, dim, next_dim, heads, n_points, ratio, init_values, drop_path, cffn_ratio=0.25):
        super().__init__()
        self.injector = Injector(dim, heads, n_points, ratio, init_values)
        self.extractor = Extractor(dim, heads, n_points, ratio, cffn_ratio, drop_path)  # with its ConvFFN
        self.next_dim = next_dim
        if next_dim:
            self.up_layer1, self.up_layer2, self.up_layer3 = (
                nn.Conv2d(dim, next_dim, 3, 2, 1, bias=False) for _ in range(3))

    def forward(self, x, prompts, hw):
        """x (B, h*w, d) stage input; prompts: 3 token lists on the (2h, 2w), (h, w), (h/2, w/2) grids.
        Returns (x injected, the next stage's prompts or None)."""
        h, w = hw
        inj, ext = deform_inputs(h, w, x.device)
        p = self.extractor(torch.cat(prompts, dim=1), x, *ext, h, w)
        x = self.injector(x, p, *inj)
        if not self.next_dim:
            return x, None
        nxt = []
        for up, t, (gh, gw) in zip((self.up_layer1, self.up_layer2, self.up_layer3), prompts, pyramid(h, w)):
            t = t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)   # (B, n, d) -> (B, d, gh, gw)
            nxt.append(up(t).flatten(2).transpose(1, 2))             # -> (B, n/4, d_next)
        return x, nxt


ADAPTER_KEYS = ("spm.", "interactions.", "level_embed")


class PromptAdapterMixin:
    """The prompt adapter beside a backbone's own modules, under the official names (spm, interactions,
    level_embed), so that official adapted checkpoints load as they are. The backbone subclass walks its
    stages in forward(img) -> (4 feature maps for the head, 4 injected stage inputs as maps)."""
    add_level_embed = True

    def add_prompt_adapter(self, dims, drop_path, deform_heads=16, n_points=4, deform_ratio=0.5,
                           init_values=1e-6, conv_inplane=64):
        self.spm = SpatialPriorModule(conv_inplane, dims[0])
        self.interactions = nn.Sequential(*[
            PromptInteraction(dims[i], dims[i + 1] if i + 1 < len(dims) else None, deform_heads, n_points,
                              deform_ratio, init_values, drop_path) for i in range(len(dims))])
        self.level_embed = nn.Parameter(torch.empty(3, dims[0]))
        self.spm.apply(adapter_init)
        self.interactions.apply(adapter_init)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def initial_prompts(self, img):
        if img.shape[2] % 64 or img.shape[3] % 64:
            raise UserError(f"input {img.shape[2]}x{img.shape[3]}: Uni-UVPT's prompt adapter needs sides that are "
                            "multiples of 64 (every prompt grid must halve evenly to stage 4); choose --crop as a "
                            "multiple of 128 (its half-scale forward too) and a --test-scale giving multiples of 64")
        prompts = self.spm(img)
        if self.add_level_embed:
            prompts = [p + self.level_embed[k] for k, p in enumerate(prompts)]
        return prompts


def _to_map(x, hw):
    return x.transpose(1, 2).reshape(x.shape[0], -1, *hw)   # (B, h*w, C) -> (B, C, h, w)


class PromptSwin(PromptAdapterMixin, SwinTransformer):
    """Swin (common.swin, official names) + the prompt adapter. Stage i: interaction on its input tokens,
    its blocks, norm{i} on the pre-merge output for the head, then patch merging (mmseg SwinBlockSequence)."""

    def forward(self, img):
        prompts = self.initial_prompts(img)
        x, hw = self.patch_embed(img)                            # (B, H/4 * W/4, C)
        feats, injected = [], []
        for i, (stage, inter) in enumerate(zip(self.layers, self.interactions)):
            x, prompts = inter(x, prompts, hw)
            injected.append(_to_map(x, hw))
            x = stage(x, hw)
            feats.append(_to_map(getattr(self, f"norm{i}")(x), hw))
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)                  # (B, L, C) -> (B, L/4, 2C)
        return feats, injected



class PromptMiT(PromptAdapterMixin, MixVisionTransformer):
    """MiT (common.mit, SegFormer names) + the prompt adapter. Stage i: patch_embed{i} on the previous
    stage's map, interaction, blocks, norm{i}. The official MiT variant owns a level_embed and never adds
    it (kept: the parameter is counted, trained by nothing)."""
    add_level_embed = False

    def forward(self, img):
        prompts = self.initial_prompts(img)
        x, feats, injected = img, [], []
        for i, inter in enumerate(self.interactions):
            patch_embed, blocks, norm = self.stage(i)
            x, h, w = patch_embed(x)                             # (B, h*w, C_i)
            x, prompts = inter(x, prompts, (h, w))
            injected.append(_to_map(x, (h, w)))
            for blk in blocks:
                x = blk(x, h, w)
            x = _to_map(norm(x), (h, w)).contiguous()            # the next stage's input and the head's map
            feats.append(x)
        return feats, injected

class UniUVPT(nn.Module):
    """Prompted backbone + DAFormer head + the three learnable scale logits of the mixture (spec 3.3;
    official name 'weight', initialised to ones). forward(img) is the test path (scale 1 only, logits
    resized to the input, align_corners=False); forward(img, label) the target objective."""

    def __init__(self, backbone, decode_head, num_classes, pc_weight=1.0, fc_weight=0.001, threshold=0.8):
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head
        self.scale_logits = nn.Parameter(torch.ones(3))
        self.num_classes, self.pc_weight, self.fc_weight, self.threshold = num_classes, pc_weight, fc_weight, threshold

    def forward(self, img, label=None):
        if label is None:
            feats, _ = self.backbone(img)
            return F.interpolate(self.decode_head(feats), img.shape[2:], mode="bilinear", align_corners=False)
        return self.target_losses(img, label)

    def target_losses(self, img, label):
        """img (B, 3, H, W), label (B, H, W) pseudo labels -> (total loss, parts, (pred, conf)): the three
        full forwards at x1, x0.5, x2 (bilinear, align_corners=True), the self-training loss on scale 1,
        the prediction consistency and the prompt-feature consistency; pred / conf (B, H, W) of the
        mixture (align_corners=False, detached) are what the label correction stores."""
        scales = [img] + [F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=True) for s in (0.5, 2)]
        logits, injected = [], []
        for x in scales:
            feats, inj = self.backbone(x)
            logits.append(self.decode_head(feats))       # (B, K, h/4, w/4) at each scale
            injected.append(inj)
        w = self.scale_logits.softmax(0)
        size = label.shape[-2:]
        up = [F.interpolate(z, size, mode="bilinear", align_corners=True) for z in logits]
        parts = {"loss_st": self_training_loss(up[0], label, self.num_classes),
                 "loss_pc": self.pc_weight * prediction_consistency(up, label, w, self.threshold)}
        for i in range(len(injected[0])):
            parts[f"loss_fc{i}"] = self.fc_weight * feature_consistency([inj[i] for inj in injected])
        with torch.no_grad():
            probs = [F.interpolate(z, size, mode="bilinear", align_corners=False).softmax(1) for z in logits]
            conf, pred = mixture(probs, w).max(dim=1)
        return sum(parts.values()), parts, (pred, conf)


# ----------------------------------------------------------------------------------------------------
# Losses (spec 3): GtA self-training loss, prediction and prompt-feature multiscale consistency

def lovasz_grad(gt_sorted):
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in decreasing order."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_softmax(probs, label, ignore=IGNORE):
    """Lovasz-softmax (Berman et al.) of probabilities (B, K, H, W) against labels (B, H, W): the batch
    is flattened into one set of pixels, ignored pixels dropped, averaged over the classes present."""
    k = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, k)       # (B*H*W, K)
    y = label.reshape(-1)
    valid = y != ignore
    p, y = p[valid], y[valid]
    losses = []
    for c in range(k):
        fg = (y == c).to(p.dtype)
        if fg.sum() == 0:                              # classes='present'
            continue
        errors, order = (fg - p[:, c]).abs().sort(descending=True)
        losses.append(errors @ lovasz_grad(fg[order]))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def self_training_loss(logits, label, num_classes):
    """GtA's target loss: Lovasz-softmax + 0.005 * robust entropy mean((H^2 + 1e-8)^2), H the per-pixel
    entropy normalised by log K (the code's 2.9444 = log 19), averaged over ALL pixels, ignored ones too."""
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    ent = -(p * logp).sum(dim=1) / math.log(num_classes)
    return lovasz_softmax(p, label) + 0.005 * ((ent ** 2 + 1e-8) ** 2).mean()


def mixture(probs, w):
    """clamp(sum_k w_k p_k, 1e-3, 1 - 1e-3): the scale mixture M, (B, K, H, W)."""
    return sum(wk * p for wk, p in zip(w, probs)).clamp(1e-3, 1 - 1e-3)


def prediction_consistency(logits, label, w, threshold=0.8):
    """mean over (b, h, w) of m * sum_k KL(p_k || M), with M the (not detached) scale mixture and m = 1
    where max_c M * [label != 255] >= threshold. The official max also runs over the batch (it trains
    at batch 1); here it is per image. logits: 3 x (B, K, H, W) at the label size."""
    probs = [z.softmax(1) for z in logits]
    m = mixture(probs, w)
    valid = (label != IGNORE)[:, None]
    mask = ((m * valid).amax(dim=1, keepdim=True) >= threshold).to(m.dtype)  # (B, 1, H, W)
    log_m = m.log()
    kl = sum(torch.xlogy(p, p) - p * log_m for p in probs)                    # F.kl_div(log M, p) summed
    return (kl * mask).sum(dim=1).mean()


def feature_consistency(feats):
    """The official prompt-feature consistency: the x0.5 and x2 maps resized to the x1 map (bilinear,
    align_corners=True), each clamped as it is to [1e-3, 1 - 1e-3] (no softmax), their mean f, and
    (1/3) sum_k MSE(f_k, f). feats: 3 x (B, C, h_k, w_k)."""
    size = feats[0].shape[-2:]
    fs = [feats[0]] + [F.interpolate(f, size, mode="bilinear", align_corners=True) for f in feats[1:]]
    fs = [f.clamp(1e-3, 1 - 1e-3) for f in fs]
    mean = sum(fs) / 3
    return sum(F.mse_loss(f, mean) for f in fs) / 3


# ----------------------------------------------------------------------------------------------------
# Online adaptive pseudo-label correction (spec 4): the official OnlineADELEPseudoUpdateHook, fed with
# what it reads but the release never produces (the full label map, the crop box, the flip).

class LabelCorrection:
    """Per class, the IoU between the model's predictions and the current pseudo labels is tracked over
    a FIFO of the last `queue` crops, one curve point every `interval` iterations. From the second epoch
    on, a class whose cubic-fitted IoU curve has flattened (relative slope change in (slope, 1)) is
    corrected for one epoch: inside an image's previous crop, pixels predicted as that class with a
    confidence above the class's `quantile` of all stored confidences take the prediction as label.

    State, compact: per image the full label map G (uint8, in the resized frame, edited in place), the
    last prediction (uint8) and confidence (fp16) at the crop, and the crop box. Images enter G on
    their first visit (`load` gives the offline map). Every process keeps the same state: it is fed
    the whole global batch, in rank order."""

    BINS = 1 << 15  # fp16 bit patterns of values in [0, 1) are < 2^15 and ordered as the values

    def __init__(self, num_classes, iters_per_epoch, interval=200, queue=1000, slope=0.95, quantile=0.8):
        self.k, self.iters_per_epoch = num_classes, iters_per_epoch
        self.interval, self.queue, self.slope, self.quantile = interval, queue, slope, quantile
        self.labels, self.preds, self.confs, self.boxes = {}, {}, {}, {}
        self.areas = torch.zeros(queue, 2, num_classes, dtype=torch.float64)  # FIFO of (intersect, union)
        self.filled, self.pos = 0, 0
        self.history = torch.zeros(0, num_classes, dtype=torch.float64)       # per-class IoU curve
        self.updating = []                                                      # U: classes being corrected
        self.last_iter = [0] * num_classes
        self.last_idx = [0] * num_classes
        self.thresholds = torch.zeros(num_classes, dtype=torch.float16)
        self.hist = torch.zeros(num_classes, self.BINS, dtype=torch.int64)     # conf histogram per pred class

    def _hist(self, pred, conf):
        idx = pred.long() * self.BINS + conf.view(torch.int16).long()
        return torch.bincount(idx.flatten(), minlength=self.k * self.BINS).view(self.k, self.BINS)

    def label(self, epoch, index, box, flip, load):
        """Before an iteration: the label crop (h, w) uint8 this image trains on, or None (epoch 0: the
        loaded offline label). Corrects G inside the previous crop first when a class is being updated."""
        if index not in self.labels:
            self.labels[index] = load()
        if epoch < 1:
            return None
        g = self.labels[index]
        if self.updating and index in self.preds:
            y1, y2, x1, x2 = self.boxes[index]
            s = g[y1:y2, x1:x2]                                    # a view: edits land in G
            u = torch.tensor(self.updating, dtype=torch.uint8)
            if torch.isin(s, u).any():
                pred, conf = self.preds[index], self.confs[index]
                change = (conf >= self.thresholds[pred.long()]) & torch.isin(pred, u)
                s[change] = pred[change]
        y1, y2, x1, x2 = box
        crop = g[y1:y2, x1:x2]
        return crop.flip(-1) if flip else crop.clone()

    def record(self, index, box, flip, pred, conf):
        """After an iteration, per image: pred (h, w) and conf (h, w) at the crop, as the model saw it."""
        if flip:
            pred, conf = pred.flip(-1), conf.flip(-1)
        pred, conf = pred.to(torch.uint8).contiguous(), conf.to(torch.float16).contiguous()
        if index in self.preds:
            self.hist -= self._hist(self.preds[index], self.confs[index])
        self.hist += self._hist(pred, conf)
        self.preds[index], self.confs[index], self.boxes[index] = pred, conf, tuple(int(v) for v in box)
        y1, y2, x1, x2 = box
        g = self.labels[index][y1:y2, x1:x2]
        valid = g != IGNORE
        p, lab = pred[valid].long(), g[valid].long()
        inter = torch.bincount(lab[p == lab], minlength=self.k)[:self.k]
        union = torch.bincount(p, minlength=self.k)[:self.k] + torch.bincount(lab, minlength=self.k)[:self.k] - inter
        self.areas[self.pos] = torch.stack([inter, union]).double()
        self.pos, self.filled = (self.pos + 1) % self.queue, min(self.filled + 1, self.queue)

    def step(self, it, epoch):
        """After an iteration's records (it = 0-based index of the iteration): the curve point, then the
        class selection and the thresholds. Returns the classes being corrected."""
        if it % self.interval:
            return self.updating
        if self.filled == self.queue:
            inter, union = self.areas.sum(0)
            self.history = torch.cat([self.history, (inter / union)[None]])   # 0/0 -> NaN
        if epoch < 1:
            return self.updating
        self.updating = [c for c in self.updating if it < self.last_iter[c] + self.iters_per_epoch]
        for c in range(self.k):
            if c not in self.updating and self.flattened(c):
                self.updating.append(c)
                self.last_iter[c], self.last_idx[c] = it, len(self.history)
        self.thresholds = self.quantile_thresholds()
        return self.updating

    def flattened(self, c):
        """Cubic least-squares fit f of class c's IoU curve since its last update, t = 1..n: is
        | |f'(n)| - |f'(1)| | / |f'(1)| in (slope, 1)? Curves with a NaN or under 4 points are skipped
        (np.polyfit fails or is underdetermined there; the official code does not guard)."""
        y = self.history[self.last_idx[c]:, c].numpy()
        if len(y) < 4 or np.isnan(y).any():
            return False
        a, b, cc, _ = np.polyfit(np.arange(1, len(y) + 1), y, 3)
        slope = lambda t: 3 * a * (t + 1e-6) ** 2 + 2 * b * (t + 1e-6) + cc   # the code's "+ 1e-6"
        with np.errstate(divide="ignore", invalid="ignore"):
            r = abs(abs(slope(len(y))) - abs(slope(1))) / abs(slope(1))
        return bool(self.slope < r < 1)

    def quantile_thresholds(self):
        """tau_c = sorted(conf of every stored pixel predicted c)[round(n * quantile)] (the last if that is
        n), 0 for a class never predicted: the official index quantile, read off the histogram."""
        out = torch.zeros(self.k, dtype=torch.float16)
        for c in range(self.k):
            n = int(self.hist[c].sum())
            if n == 0:
                continue
            i = min(int(round(n * self.quantile)), n - 1)
            bits = int(torch.searchsorted(self.hist[c].cumsum(0), torch.tensor(i), right=True))
            out[c] = torch.tensor(bits, dtype=torch.int16).view(torch.float16)
        return out

    def state_dict(self):
        return {"labels": self.labels, "preds": self.preds, "confs": self.confs,
                "boxes": {i: torch.tensor(b) for i, b in self.boxes.items()}, "areas": self.areas,
                "filled": self.filled, "pos": self.pos, "history": self.history, "updating": list(self.updating),
                "last_iter": list(self.last_iter), "last_idx": list(self.last_idx), "thresholds": self.thresholds}

    def load_state_dict(self, s):
        self.labels, self.preds, self.confs = dict(s["labels"]), dict(s["preds"]), dict(s["confs"])
        self.boxes = {i: tuple(int(v) for v in b) for i, b in s["boxes"].items()}
        self.areas, self.filled, self.pos, self.history = s["areas"], s["filled"], s["pos"], s["history"]
        self.updating, self.last_iter, self.last_idx = list(s["updating"]), list(s["last_iter"]), list(s["last_idx"])
        self.thresholds = s["thresholds"]
        self.hist.zero_()
        for i in self.preds:
            self.hist += self._hist(self.preds[i], self.confs[i])


# ----------------------------------------------------------------------------------------------------
# Networks, checkpoints (audit B.2-8) and the optimiser (spec 5, 6)

def build_model(args, num_classes):
    """--stage source / pseudo: the plain source segmentor; adapt: UniUVPT with every backbone parameter
    but the adapter's frozen (the paper; --unfreeze-backbone: the official launcher)."""
    bb = BACKBONES[args.backbone]
    prompted = args.stage == "adapt"
    if bb["kind"] == "swin":
        backbone = (PromptSwin if prompted else SwinTransformer)(**bb["arch"], drop_path_rate=args.drop_path)
        dims = backbone.num_features
    else:
        backbone = (PromptMiT if prompted else MixVisionTransformer)(**bb["arch"], drop_path_rate=args.drop_path)
        dims = list(backbone.embed_dims)
    head = DAFormerHead(dims, num_classes, embed_dim=args.head_channels, channels=args.head_channels)
    if not prompted:
        return EncoderDecoder(backbone, head)
    backbone.add_prompt_adapter(dims, args.drop_path, args.deform_heads, args.n_points, args.deform_ratio,
                                args.init_values, args.conv_inplane)
    model = UniUVPT(backbone, head, num_classes, args.pc_weight, args.fc_weight, args.mask_threshold)
    if not args.unfreeze_backbone:
        freeze_all_but(model, lambda n: not n.startswith("backbone.") or n[len("backbone."):].startswith(ADAPTER_KEYS))
    return model


def summarize(model, args):
    adapter = lambda n: n.startswith("backbone.") and n[len("backbone."):].startswith(ADAPTER_KEYS)
    return summary(model, {f"backbone ({args.backbone})": lambda n: n.startswith("backbone.") and not adapter(n),
                           "prompt adapter (spm, interactions, level_embed)": adapter,
                           "decode head (DAFormer)": lambda n: n.startswith("decode_head."),
                           "scale logits": lambda n: n == "scale_logits"})


KIND_NAMES = {"swin": "Swin", "mit": "MiT (SegFormer)"}


def _backbone_kind(sd):
    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    if any(k.startswith(("patch_embed1.", "block1.")) or re.match(r"layers\.\d+\.\d\.", k) for k in keys):
        return "mit"
    if any(k.startswith(("patch_embed.", "stages.", "layers.")) for k in keys):
        return "swin"
    return None


def load_segmentor(model, path, what, args):
    """A source model (into the plain or the prompted network) or an adapted one (--eval-only): the
    backbone in any published layout (Swin: ours = Microsoft's names, or mmseg's; MiT: NVlabs or mmseg),
    the head strictly, the official top-level 'weight' as scale_logits. The training-only heads of a
    Source-GtA file (decode_head_aug0..5) are dropped with one line. A source model leaves the adapter at
    its init, as the official non-strict backbone load does."""
    ck = load_checkpoint(path, what)
    sd = unwrap_state_dict(ck, ("model", "state_dict"))
    if not isinstance(sd, dict) or not any(str(k).startswith("decode_head.") for k in sd):
        raise UserError(f"{what} {path}: no segmentor weights (expected 'model' or 'state_dict' holding "
                        "backbone.* and decode_head.* keys)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    kind, want = _backbone_kind(sd), BACKBONES[args.backbone]["kind"]
    if kind != want:
        raise UserError(f"{what} {path} holds a {KIND_NAMES.get(kind, 'unknown')} backbone, but --backbone "
                        f"{args.backbone} is a {KIND_NAMES[want]}: pass the --backbone it was trained with")
    aug = [k for k in sd if k.startswith("decode_head_aug")]
    if aug:
        print(f"{what} {path}: Source-GtA model: dropped the {len(aug)} keys of its training-only heads "
              f"decode_head_aug0..5 (decode_head is the global head)")
    prompted = isinstance(model, UniUVPT)
    has_adapter = any(k[len("backbone."):].startswith(ADAPTER_KEYS) for k in sd if k.startswith("backbone."))
    if has_adapter and not prompted:
        raise UserError(f"{what} {path} is an adapted Uni-UVPT model (it holds the prompt adapter); evaluate it "
                        "with --stage adapt --eval-only --checkpoint, or pass the source model here")
    rest = [k for k in sd if not k.startswith(("backbone.", "decode_head.", "decode_head_aug"))
            and k not in ("weight", "scale_logits")]
    if rest:
        raise UserError(f"{what} {path}: unexpected keys outside backbone / decode_head: {', '.join(rest[:5])}")
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    allow = ADAPTER_KEYS if prompted and not has_adapter else ()
    if kind == "swin":
        load_swin_pretrained(model.backbone, backbone, allow_missing=allow)
    else:
        load_mit_pretrained(model.backbone, backbone, allow_missing=allow, verbose=False)
    head = {k[len("decode_head."):]: v for k, v in sd.items() if k.startswith("decode_head.")}
    load_state_dict_checked(model.decode_head, head, f"{what} {path} (decode_head.*)")
    w = sd.get("scale_logits", sd.get("weight"))
    if prompted and w is not None:
        with torch.no_grad():
            model.scale_logits.copy_(w)


# mmcv custom_keys of the configs (common.train.custom_key_groups): the longest key contained in a parameter's
# name wins (ties by name), so adapter LayerNorms keep weight decay and head BNs too (spec 6)
SOURCE_KEYS = {"head": dict(lr_mult=10.0), "pos_block": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
ADAPT_KEYS = {**SOURCE_KEYS, "level_embed": dict(lr_mult=5.0), "spm": dict(lr_mult=5.0),
              "interactions": dict(lr_mult=5.0)}


def build_optimizer(model, args, keys):
    opt = torch.optim.AdamW(custom_key_groups(model, args.weight_decay, keys), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay)
    init_lr(opt, args.lr)
    return opt


# ----------------------------------------------------------------------------------------------------
# Data: the source (labelled), the target train split (images only, + pseudo labels), the target val split

def target_split(args, split, transform, with_labels):
    pr = PRESETS[args.preset]
    if args.preset == "synthetic":
        n = args.num_samples or 64
        n = n if split == "train" else max(4, n // 2)
        return SyntheticSeg(n, pr["num_classes"], size=(128, 128), split=split, transform=transform, seed=args.seed,
                            domain="target", with_labels=with_labels)
    return build_dataset(pr["target"], args.target_root, split, transform, with_labels=with_labels)


def target_image(ds, i):
    """The decoded image of target sample i, (H, W, 3) uint8; a label file is never opened."""
    return ds.generate(i)[0] if isinstance(ds, SyntheticSeg) else ds.load(i)[0]


def pseudo_names(ds, args):
    """The pseudo-label files of a target train split, relative to --pseudo-dir: Cityscapes'
    <city>/<stem>_gtFine_labelTrainIds.png as the official generate_pseudo_label.py writes them."""
    if isinstance(ds, SyntheticSeg):
        return [f"{ds.name}_{ds.split}_{i:06d}_labelTrainIds.png" for i in range(len(ds))]
    spec = DATASETS[ds.name]
    img_dir = os.path.join(args.target_root, spec["splits"]["train"][0][0])
    return [os.path.relpath(p, img_dir)[:-len(spec["img_suffix"])] + spec["label_suffix"] for p, _ in ds.items]


class PseudoLabelled(torch.utils.data.Dataset):
    """Target training samples: the image (never its label) with its pseudo label from --pseudo-dir,
    through the training transform; each sample carries its index and crop geometry for the correction."""

    def __init__(self, images, paths, num_classes, transform):
        self.images, self.paths, self.num_classes, self.transform = images, paths, num_classes, transform

    def __len__(self):
        return len(self.paths)

    def read(self, i):
        return read_label(self.paths[i], self.num_classes, False)

    def full_label(self, i, size):
        """The offline pseudo label in the resized (h, w) frame, uint8: where the correction starts."""
        return torch.from_numpy(np.ascontiguousarray(resize_nearest(self.read(i), tuple(size))))

    def __getitem__(self, key):
        i, seed = key if isinstance(key, (tuple, list)) else (key, None)
        img, label = target_image(self.images, i), self.read(i)
        if label.shape != img.shape[:2]:
            raise UserError(f"pseudo label {self.paths[i]} is {label.shape[0]}x{label.shape[1]}, its image "
                            f"{img.shape[0]}x{img.shape[1]}; expected the original image size (--stage pseudo)")
        x, y, meta = apply_transform(self.transform, img, label, np.random.default_rng(seed))
        return dict(img=x, label=y, index=i, meta=meta)


def check_pseudo_dir(args, names):
    """--pseudo-dir must hold exactly one label per target training image, under the names --stage pseudo
    gives them (the official release wrote pretrain2/ and read pretrain/: one folder here)."""
    d = args.pseudo_dir
    if not os.path.isdir(d):
        raise UserError(f"--pseudo-dir {d} is not a folder; write the pseudo labels with --stage pseudo first")
    have = {os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs if f.endswith(".png")}
    missing = [n for n in names if n not in have]
    extra = sorted(have - set(names))
    if missing or extra:
        raise UserError(f"--pseudo-dir {d} does not match the target train split ({len(names)} images): "
                        f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} not of this split "
                        f"(e.g. {extra[:1]}); run --stage pseudo for this target into an empty folder")
    manifest = os.path.join(d, "pseudo_labels.json")
    if os.path.isfile(manifest):
        m = json.load(open(manifest))
        want = PRESETS[args.preset]["target"]
        if m.get("target") != want:
            raise UserError(f"--pseudo-dir {d} holds pseudo labels of '{m.get('target')}', not of '{want}'")


# ----------------------------------------------------------------------------------------------------
# Stage pseudo (spec 1.2): whole image at the test scale, logits resized to the original size, argmax,
# no threshold; one uint8 PNG per target training image

@torch.no_grad()
def write_pseudo_labels(args, info, model, num_classes):
    target = target_split(args, "train", TestTransform(scale=args.test_scale), with_labels=False)
    names, d = pseudo_names(target, args), args.pseudo_dir
    if os.path.isdir(d) and any(os.scandir(d)):
        raise UserError(f"--pseudo-dir {d} is not empty; write the pseudo labels into a new folder (nothing was "
                        "written)")
    D.barrier()
    model.eval()
    shard = D.ShardSampler(len(target), info.rank, info.world_size)
    loader = D.data_loader(target, min(args.workers, 2), batch_size=1, sampler=shard, collate_fn=collate_single)
    for i, s in zip(shard, tqdm(loader, desc="pseudo labels", disable=not info.is_main)):
        probs = predict(model, s["img"].to(info.device), s["label"].shape[-2:], num_classes)  # (1, K, H0, W0)
        path = os.path.join(d, names[i])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(probs.argmax(1)[0].to(torch.uint8).cpu().numpy()).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
    D.barrier()
    if info.is_main:
        manifest = dict(target=PRESETS[args.preset]["target"], split="train", images=len(names),
                        source_checkpoint=args.source_checkpoint, backbone=args.backbone, test_scale=args.test_scale)
        with open(os.path.join(d, "pseudo_labels.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        print(f"wrote {len(names)} pseudo labels to {d}; train on them with --stage adapt --pseudo-dir {d}")
    if not args.eval_pseudo:
        return None
    # evaluation only: the target train split's ground truth, read here and nowhere else
    gt = target_split(args, "train", None, with_labels=True)
    metric = SegMetric(num_classes)
    for i in shard:
        label = gt.generate(i)[1] if isinstance(gt, SyntheticSeg) else gt.load(i)[1]
        pseudo = read_label(os.path.join(d, names[i]), num_classes, False)
        metric.update(torch.from_numpy(pseudo), torch.from_numpy(label))
    m = metrics_line(metric.reduce().compute(), PRESETS[args.preset].get("subsets"))
    if info.is_main:
        print("pseudo labels vs the target train ground truth: " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    return m


def check_test_size(ds, scale, what):
    """The adapter needs sides that are multiples of 64: checked on the first image of a split (its header
    only) before anything runs. Cityscapes: 2048x1024 -> 1024x512."""
    if isinstance(ds, SyntheticSeg):
        h, w = ds.size
    else:
        with Image.open(ds.items[0][0]) as im:
            w, h = im.size
    oh, ow = TestTransform(scale=scale).output_size(h, w)
    if oh % 64 or ow % 64:
        raise UserError(f"--test-scale {scale[0]} {scale[1]}: {what} images ({h}x{w}) become {oh}x{ow}, but "
                        "Uni-UVPT's prompt adapter needs sides that are multiples of 64 (the paper: 1024x512)")


def metrics_line(m, subsets):
    out = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
    if subsets:
        out["mIoU16"], out["mIoU13"] = subset_miou(m["IoU"], SYNTHIA16), subset_miou(m["IoU"], SYNTHIA13)
    return out


# ----------------------------------------------------------------------------------------------------
# main: source training, pseudo labels, adaptation (the correction hook around each iteration)

def main(argv=None):
    args = get_args(argv)
    num_classes = PRESETS[args.preset]["num_classes"]
    if args.summary:
        with torch.device("meta"):
            model = build_model(args, num_classes)
        summarize(model, args)
        return None
    info = D.setup(args.device)
    result = run(args, info, num_classes)
    D.cleanup()
    return result


def run(args, info, num_classes):
    dev, pr, source = info.device, PRESETS[args.preset], args.stage == "source"
    D.seed_everything(args.seed + info.rank)
    model = build_model(args, num_classes)
    palette = get_palette("synthetic" if args.preset == "synthetic" else "cityscapes", num_classes)
    val = target_split(args, "val", TestTransform(scale=args.test_scale), with_labels=True)
    if args.stage == "adapt":
        check_test_size(val, args.test_scale, "the target val")
    shard = D.ShardSampler(len(val), info.rank, info.world_size)
    val_loader = D.data_loader(val, min(args.workers, 2), batch_size=1, sampler=shard, collate_fn=collate_single)

    def run_eval(tag):
        vis = overlay_writer(os.path.join(args.work_dir, "vis", tag), val, palette, args.vis) \
            if info.is_main and args.vis else None
        m = evaluate(model, val_loader, num_classes, dev, lambda mm, x, size: predict(mm, x, size, num_classes),
                     info.is_main, vis)
        return metrics_line(m, pr.get("subsets"))

    if args.eval_only:
        path = args.checkpoint or os.path.join(args.work_dir, "best.pt")
        load_segmentor(model, path, "--checkpoint", args)
        model.to(dev)
        m = run_eval("eval")
        if info.is_main:
            print("target val: " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
        return m
    if args.stage == "pseudo":
        load_segmentor(model, args.source_checkpoint, "--source-checkpoint", args)
        return write_pseudo_labels(args, info, model.to(dev), num_classes)

    # data first: a bad --pseudo-dir or data root fails before anything is written
    if source:
        tf = TrainTransform(scale=args.scale, crop=args.crop, ratio_range=None)
        if args.preset == "synthetic":
            train_set = SyntheticSeg(args.num_samples or 64, num_classes, size=(128, 128), split="train", transform=tf,
                                     seed=args.seed, domain="source")
        else:
            train_set = build_dataset(pr["source"], args.source_root, "train", tf)
    else:
        images = target_split(args, "train", None, with_labels=False)
        names = pseudo_names(images, args)
        check_pseudo_dir(args, names)
        tf = TrainTransform(scale=args.scale, crop=args.crop, ratio_range=None)
        train_set = PseudoLabelled(images, [os.path.join(args.pseudo_dir, n) for n in names], num_classes, tf)
    if len(train_set) == 0:
        raise UserError("the training split is empty")
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size

    book = RunBook(args, info)
    if not args.resume:
        if not source:
            load_segmentor(model, args.source_checkpoint, "--source-checkpoint", args)
        elif args.pretrained:
            (load_swin_pretrained if BACKBONES[args.backbone]["kind"] == "swin" else load_mit_pretrained)(
                model.backbone, args.pretrained)
        elif args.preset != "synthetic" and info.is_main:
            print("note: no --pretrained: the backbone starts from scratch (the recipe starts from ImageNet)")
    model.to(dev)
    D.broadcast_params(model)  # one model on every process: the adapter's random init is drawn per process
    opt = build_optimizer(model, args, SOURCE_KEYS if source else ADAPT_KEYS)
    n = len(train_set)
    corr = None if source or args.no_update_pseudo else LabelCorrection(
        num_classes, n / args.batch_size, args.curve_interval, args.queue, args.slope_threshold, args.quantile)
    ck = book.resume(model, opt)
    if ck is not None and corr is not None:
        corr.load_state_dict(ck["correction"])
    start = book.start
    batches = D.train_batches(train_set, per_rank, info, args.seed, start, args.workers)
    if info.is_main:
        print(f"{args.stage} on {args.preset} ({args.backbone}): {count_params(model, True):,} trainable of "
              f"{count_params(model):,} parameters; {args.iters} iterations at batch {args.batch_size} "
              f"({info.world_size} process(es) on {dev})")

    model.train()  # the frozen backbone's stochastic depth stays active, as in the official code
    stop = min(args.iters, args.stop_at or args.iters)
    per_epoch = math.ceil(n / args.batch_size)  # mmcv's IterLoader: an epoch is one pass of the loader
    bar = tqdm(range(start, stop), initial=start, total=args.iters, disable=not info.is_main, desc=args.stage)
    t0 = time.time()
    for it in bar:
        D.seed_step(args.seed, it, info.rank)
        set_lr(opt, warmup_poly_mmcv(it, args.iters, args.warmup) if source else warmup_cosine(it, args.iters, 0, 1e-5))
        batch = next(batches)
        img, label = batch["img"].to(dev), batch["label"].to(dev)
        if source:
            loss, parts = model(img, label)
        else:
            epoch = it // per_epoch
            if corr is not None:
                # every process applies the corrections of the whole global batch, in rank order
                meta = batch["meta"]
                rows = torch.stack([batch["index"], *meta["box"], meta["flip"].long(), *meta["size"]], 1)
                rows = D.gather_tensors(rows, dev)
                for r, (i, y1, y2, x1, x2, flip, h, w) in enumerate(rows.tolist()):
                    crop = corr.label(epoch, i, (y1, y2, x1, x2), bool(flip), lambda: train_set.full_label(i, (h, w)))
                    if crop is not None and r // per_rank == info.rank:
                        label[r % per_rank] = IGNORE
                        label[r % per_rank, :crop.shape[0], :crop.shape[1]] = crop.to(dev)
            loss, parts, (pred, conf) = model(img, label)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at iteration {it}; stopping without saving")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        D.average_gradients(model)
        opt.step()
        D.broadcast_params(model, buffers_only=True)  # rank 0's BatchNorm statistics, as DDP's broadcast_buffers
        if corr is not None:
            preds, confs = D.gather_tensors(pred.to(torch.uint8), dev), D.gather_tensors(conf.float(), dev)
            for (i, y1, y2, x1, x2, flip, _, _), p, c in zip(rows.tolist(), preds, confs):
                corr.record(i, (y1, y2, x1, x2), bool(flip), p[:y2 - y1, :x2 - x1], c[:y2 - y1, :x2 - x1])
            corr.step(it, epoch)

        done = it + 1
        if info.is_main and (done % args.log_interval == 0 or done == stop):
            rec = {"iter": done, "loss": loss.item(), "lr": max(g["lr"] for g in opt.param_groups),
                   "sec_per_iter": (time.time() - t0) / (done - start), **{k: v.item() for k, v in parts.items()}}
            if corr is not None:
                rec["correcting"] = list(corr.updating)
            book.log(**rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        due = done % args.eval_interval == 0 or done == args.iters
        save = done % args.ckpt_interval == 0 or done == stop
        book.step_end(done, model, opt, save=save,
                      evaluate=(lambda: run_eval(f"iter_{done}")) if due else None,
                      extra=lambda: {"correction": corr.state_dict()} if corr is not None else {})
    bar.close()
    book.finish()
    return book.last_metrics


if __name__ == "__main__":
    cli(main)
