"""ATP: a curriculum-style self-training approach for source-free semantic segmentation (TPAMI 2024).

Wang, Liang, Zhang. Official code: github.com/yxiwang/ATP (mmseg 0.16 / DAFormer / SePiCo). This file is
the whole method in plain PyTorch on MiT-B5 + the DAFormer head: a source model trained on labelled
source images, then three adaptation steps that see only unlabelled target images and the previous
step's weights, and an entropy ranking between the last two. Spec: shared/papers/atp.md, corrected by
shared/papers/audit_atp_uni_uvpt.md.

    # source model (DAFormer source-only recipe; MiT-B5 ImageNet weights from SegFormer's mit_b5.pth):
    python atp_sfda.py --stage source --preset gta2cs --source-root data/gta --target-root data/cityscapes \
        --pretrained pretrained/mit_b5.pth --work-dir work_dirs/gta_source
    # the three steps and the ranking, each from the previous step's checkpoint, source data never read
    # (best.pt: the run's best target-val evaluation, the release's save_best='mIoU'; or last.pt):
    python atp_sfda.py --stage align     --preset gta2cs --target-root data/cityscapes \
        --init work_dirs/gta_source/best.pt --work-dir work_dirs/gta_align
    python atp_sfda.py --stage teach     --preset gta2cs --target-root data/cityscapes \
        --init work_dirs/gta_align/best.pt  --work-dir work_dirs/gta_teach
    python atp_sfda.py --stage rank      --preset gta2cs --target-root data/cityscapes \
        --init work_dirs/gta_teach/best.pt  --work-dir work_dirs/gta_rank        # writes ranking.json
    python atp_sfda.py --stage propagate --preset gta2cs --target-root data/cityscapes \
        --init work_dirs/gta_teach/best.pt  --ranking work_dirs/gta_rank/ranking.json --work-dir work_dirs/gta_prop
    # evaluate ours or an official ATP checkpoint (model. / ema_model. prefixes; the student is used):
    python atp_sfda.py --stage propagate --preset gta2cs --target-root data/cityscapes --eval-only \
        --checkpoint gta2cityscapes_daformer_propagating.pth
    # several processes: torchrun --nproc_per_node=2 atp_sfda.py ... (the batch is split over them)

The steps (all of them: AdamW 6e-5, head lr x10, no decay on norms, 1500-iteration warmup + poly,
40k iterations, batch 2, 640 crops of the target resized to 1280x640, flip; a fresh optimizer each):
- align (A): L = 0.001 mean[(1-H)^5 H] - 1e-4 * H(weighted mean prediction), H the per-pixel entropy
  normalised by log C, weights exp(-3H) (detached); the student sees a strong augmentation of the crop.
- teach (T): an EMA teacher (alpha = min(1 - 1/(t+1), 0.999)) labels the weak crop; the student is
  trained on the strong crop with cross-entropy on every pixel plus the negative-learning term
  -log(1 - sum of the student's probabilities below 0.04).
- rank: the entropy of every target training image under the model gives an easy (first 30 %) and a
  hard (the rest) list.
- propagate (P): easy images supervised by the teacher's labels, ClassMix of easy into hard images (the
  hard pixels weighted by the teacher's confident fraction, top 15 / bottom 120 rows zero: the ego car at
  640 crops; --ignore-top / --ignore-bottom, 0 in the synthetic preset, whose crops are 64), and, from
  iteration 1500, a prototype contrastive loss on the hard images through the projection head.

Choices where the release is broken or silent (audit A.2 / A.4), each followed here:
- every step starts from --init (the previous step's student), not from a hard-coded file; the teacher
  is re-initialised as a copy of the student at iteration 0 of each step, as the code does;
- align freezes the decode head (the paper's figure draws the classifier locked; the release trains
  everything, `--align-train-head` does that); its loss is EntropyLoss, which no released config selects;
- the teacher runs in train mode (batch statistics) with dropout and DropPath off; its BN running
  buffers are not averaged, as the code; evaluation uses the student;
- the release de-normalises the easy images in place before extracting the prototype features (80 % of
  the iterations see [0, 1] pixels): here the features are computed from the normalised images;
- the ranking runs in eval mode under no_grad (the release forgets both) on the target *train* split;
- step P pairs its easy and hard images from two independent shuffled loaders of the target train
  split (the release's UDADataset pairs them through the source dataset's length);
- evaluation is on the target's labelled val split (the release's test config points at train);
- the ACDC class prior (from DANNet) multiplies the test-resolution softmax, then the probabilities are
  resized, as the release, on the CPU too; Cityscapes -> ACDC presets train on one condition each;
- SYNTHIA (absent from the release) follows DAFormer: source resized to 1280x760, 19-way model,
  mIoU16 and mIoU13 reported over the class subsets.
Multi-process runs average the gradients of each process's part of the batch; the official runs used
one GPU with batch 2.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist as D
from common.daformer import ConvModule, DAFormerHead
from common.io import (ArgumentParser, UserError, check_flags, cli, load_checkpoint, load_state_dict_checked,
                       state_dict_of, work_dir_problem)
from common.metrics import SYNTHIA13, SYNTHIA16, subset_miou
from common.mit import MIT_SIZES, load_mit_pretrained, mit
from common.palettes import class_names, get_palette
from common.seg_data import MEAN, STD, SyntheticSeg, TestTransform, TrainTransform, build_dataset, check_files
from common.segment import collate_single, evaluate, overlay_writer, resize
from common.swin import DropPath
from common.train import (RunBook, count_params, custom_key_groups, freeze_all_but, init_lr, set_lr, summary,
                          warmup_poly_mmcv)

# ----------------------------------------------------------------------------------------------------
# Presets (spec sections 2, 7, 9). Every value can be overridden by a flag.

CS = dict(target="cityscapes", target_scale=(1280, 640), test_scale=(1280, 640))
# ACDC: the loader gives the whole 1280x720 image, the step takes a class-balanced crop of the pseudo label
ACDC = dict(target_scale=(1280, 720), loader_crop=(720, 1280), test_scale=(1280, 720), class_prior=True)
PRESETS = {
    "gta2cs": dict(source="gta5", source_scale=(1280, 720), **CS),
    "syn2cs": dict(source="synthia", source_scale=(1280, 760), subsets=True, **CS),
    **{f"cs2acdc_{c}": dict(source="cityscapes", source_scale=(1024, 512), target=f"acdc_{c}", **ACDC)
       for c in ("fog", "night", "rain", "snow")},
    # the quick start: a tiny MiT on the synthetic domain pair (96x96 images, 6 classes, 3-5 objects each)
    "synthetic": dict(source="synthetic", target="synthetic", source_scale=(96, 96), target_scale=(96, 96),
                      test_scale=(96, 96), source_crop=64, crop=64, iters=200, batch_size=8,
                      warmup=20, start_contrast=50, eval_interval=50, source_lr=6e-4, lr=6e-5,
                      ignore_top=0, ignore_bottom=0,
                      arch=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                sr_ratios=(4, 2, 1, 1)), head_dim=32, proj_dim=32),
}
RECIPE = dict(iters=40_000, warmup=1500, lr=6e-5, weight_decay=0.01, batch_size=2, crop=640, source_crop=512,
              eval_interval=1000, start_contrast=1500, arch=None, head_dim=256, proj_dim=512,
              ignore_top=15, ignore_bottom=120)
# Cityscapes class frequencies of the ACDC test-time prior (DANNet, released evaluator)
CITYSCAPES_FREQ = (0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341, 0.00207795,
                   0.0055127, 0.15928651, 0.01157818, 0.04018982, 0.01218957, 0.00135122, 0.06994545,
                   0.00267456, 0.00235192, 0.00232904, 0.00098658, 0.00413907)
SYN_SIZE = (96, 96)
# scene-like synthetic images: several objects each, so that the entropy ranking sorts images by how they
# look rather than by which classes they hold (with 1-4 objects, the easy third held few of the uncertain
# classes, and step P, which supervises the easy images fully, unlearned them)
SYN_OBJECTS = (3, 5)
# DAFormer's mmcv custom_keys (common.train.custom_key_groups): heads lr x10, no decay on the MiT LayerNorms
CUSTOM_KEYS = {"head": dict(lr_mult=10.0), "pos_block": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
STAGES = ("source", "align", "teach", "rank", "propagate")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", required=True, choices=STAGES, help="source training, the steps A / T / P, or the entropy ranking")
    a("--preset", default="gta2cs", choices=sorted(PRESETS),
      help="benchmark: source -> target (synthetic: the quick start, no files)")
    a("--source-root", default=None, help="--stage source: the source dataset in its official layout")
    a("--target-root", default=None, help="the target dataset (train images unlabelled; val for evaluation)")
    a("--work-dir", default="work_dirs/atp", help="holds last.pt, best.pt, log.jsonl, vis/ (rank: ranking.json)")
    a("--pretrained", default=None, help="--stage source: SegFormer ImageNet mit_b5.pth (or mmseg layout)")
    a("--init", default=None, help="steps A/T/P and rank: the previous step's checkpoint (ours or official)")
    a("--ranking", default=None, help="--stage propagate: the ranking.json written by --stage rank")
    # model
    a("--backbone", default="mit_b5", choices=sorted(MIT_SIZES), help="MiT size (paper: mit_b5)")
    a("--drop-path", type=float, default=0.1, help="MiT stochastic depth (DAFormer 0.1)")
    a("--embed-dims", type=int, nargs=4, default=None, help="override the MiT widths (small runs)")
    a("--depths", type=int, nargs=4, default=None, help="override the MiT depths")
    a("--num-heads", type=int, nargs=4, default=None, help="override the MiT heads")
    a("--sr-ratios", type=int, nargs=4, default=None, help="override the MiT spatial-reduction ratios")
    a("--head-channels", type=int, default=None, help="DAFormer head embed / channels (256)")
    a("--proj-channels", type=int, default=None, help="projection head output (512; its middle is 256)")
    a("--source-scale", type=int, nargs=2, default=None, help="source keep-ratio resize (long short; preset)")
    a("--target-scale", type=int, nargs=2, default=None, help="target training resize (long short; 1280 640)")
    a("--test-scale", type=int, nargs=2, default=None, help="target test resize (long short; 1280 640)")
    # schedule (preset / recipe defaults)
    a("--iters", type=int, default=None, help="iterations of this step (40k)")
    a("--batch-size", type=int, default=None, help="global batch over all processes (2; P: 2 easy + 2 hard)")
    a("--lr", type=float, default=None, help="AdamW lr (6e-5; the heads x10)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay (0.01, none on norms)")
    a("--warmup", type=int, default=None, help="linear warmup iterations from 1e-6 x lr (1500)")
    a("--crop", type=int, default=None, help="adaptation crop (640)")
    a("--source-crop", type=int, default=None, help="source training crop (512)")
    a("--start-contrast", type=int, default=None, help="step P: iteration the contrastive loss starts (1500)")
    a("--ignore-top", type=int, default=None,
      help="step P: top rows of the hard images' pseudo-label weight set to 0 (15; synthetic 0)")
    a("--ignore-bottom", type=int, default=None,
      help="step P: bottom rows set to 0 (120: Cityscapes' ego car at 640 crops; synthetic 0)")
    a("--easy-ratio", type=float, default=0.3, help="rank: fraction of the target images called easy (0.3)")
    a("--align-train-head", action="store_true", help="step A: train the decode head too (the release)")
    a("--no-class-prior", action="store_true", help="ACDC: evaluate without the test-time class prior")
    a("--eval-interval", type=int, default=None, help="evaluate on the target val split every N iterations (1000)")
    a("--ckpt-interval", type=int, default=1000, help="write last.pt every N iterations")
    a("--log-interval", type=int, default=50)
    a("--num-samples", type=int, default=None, help="synthetic only: images per split (default 96 / 32)")
    a("--workers", type=int, default=2, help="data-loading processes per training process")
    a("--seed", type=int, default=76, help="the official seed")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--resume", action="store_true", help="continue exactly from work-dir/last.pt")
    a("--eval-only", action="store_true", help="evaluate --checkpoint on the target val split and exit")
    a("--checkpoint", default=None, help="with --eval-only: ours (best.pt / last.pt) or an official ATP file")
    a("--summary", action="store_true", help="print parameter counts per module group and exit (no data)")
    a("--vis", type=int, default=8, help="image | truth | prediction pictures in work-dir/vis per evaluation")
    a("--skip-data-check", action="store_true", help="do not open every file's header before training")
    a("--stop-at", type=int, default=None, help="stop after this iteration as if interrupted (tests --resume)")
    args = p.parse_args(argv)
    preset = {**RECIPE, **PRESETS[args.preset]}
    if args.stage == "source" and "source_lr" in preset and args.lr is None:
        args.lr = preset["source_lr"]  # the synthetic source model learns from scratch
    for k in ("iters", "batch_size", "lr", "weight_decay", "warmup", "crop", "source_crop", "start_contrast",
              "eval_interval", "ignore_top", "ignore_bottom"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.class_prior = preset.get("class_prior", False) and not args.no_class_prior
    arch = dict(preset["arch"] or MIT_SIZES[args.backbone])
    for k in ("embed_dims", "depths", "num_heads", "sr_ratios"):
        arch[k] = tuple(getattr(args, k) or arch[k])
    args.arch = arch
    args.head_channels = args.head_channels or preset["head_dim"]
    args.proj_channels = args.proj_channels or preset["proj_dim"]
    for k in ("source_scale", "target_scale", "test_scale"):
        setattr(args, k, tuple(getattr(args, k) or preset[k]))
    check_flags(p, args, positive=("iters", "batch_size", "lr", "crop", "source_crop", "eval_interval",
                                   "ckpt_interval", "log_interval", "easy_ratio", "embed_dims", "depths",
                                   "num_heads", "sr_ratios", "head_channels", "proj_channels", "source_scale",
                                   "target_scale", "test_scale", "num_samples"),
                non_negative=("warmup", "weight_decay", "workers", "start_contrast", "drop_path", "vis", "ignore_top",
                              "ignore_bottom"),
                below_one=("easy_ratio", "drop_path"))
    if args.summary:
        return args
    synthetic = args.preset == "synthetic"
    if args.stage == "source" and not args.eval_only and not synthetic and not args.source_root:
        p.error(f"--stage source needs --source-root (the {preset['source']} folder)")
    if not synthetic and not args.target_root:
        p.error(f"--target-root is required (the {preset['target']} folder)")
    if args.stage != "source" and not (args.init or args.resume or args.eval_only):
        p.error(f"--stage {args.stage} needs --init: the previous step's checkpoint "
                f"({'source' if args.stage == 'align' else 'align' if args.stage == 'teach' else 'teach'})")
    for flag in ("pretrained", "init", "checkpoint", "ranking"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            p.error(f"--{flag} {path}: file not found")
    if args.stage == "propagate" and not args.ranking and not args.eval_only:
        p.error("--stage propagate needs --ranking: the ranking.json written by --stage rank")
    problem = None if args.eval_only else work_dir_problem(args.work_dir)
    if problem:
        p.error(f"--work-dir {args.work_dir}: {problem}")
    return args


# ----------------------------------------------------------------------------------------------------
# Model: MiT + DAFormer head (+ the projection head of step P), mmseg attribute names so the official
# checkpoints' backbone. / decode_head. / auxiliary_head. keys load as they are.

class ProjHead(nn.Module):
    """SePiCo's projection head: the four maps resized to stride 4 and concatenated (1024 channels for
    MiT-B5) -> 1x1 ConvModule to 256 -> 1x1 ConvModule to 512 -> L2 normalised over channels."""

    def __init__(self, in_channels, mid=256, out=512):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(sum(in_channels), mid), ConvModule(mid, out))

    def forward(self, feats):
        x = torch.cat([resize(f, feats[0].shape[2:]) for f in feats], dim=1)  # (B, sum C_i, H/4, W/4)
        return F.normalize(self.convs(x), p=2, dim=1)


class Segmentor(nn.Module):
    def __init__(self, backbone, decode_head, auxiliary_head=None):
        super().__init__()
        self.backbone, self.decode_head, self.auxiliary_head = backbone, decode_head, auxiliary_head

    def forward(self, img):
        """Logits at the input size (mmseg encode_decode): (B, 3, H, W) -> (B, K, H, W)."""
        return resize(self.decode_head(self.backbone(img)), img.shape[2:])

    def project(self, img):
        """The projection head's L2-normalised features at stride 4, (B, D, H/4, W/4)."""
        return self.auxiliary_head(self.backbone(img))


def build_model(args, num_classes, with_proj):
    backbone = mit(args.backbone, drop_path_rate=args.drop_path, **args.arch)
    dims = backbone.embed_dims
    head = DAFormerHead(dims, num_classes, embed_dim=args.head_channels, channels=args.head_channels)
    proj = ProjHead(dims, mid=args.head_channels, out=args.proj_channels) if with_proj else None
    return Segmentor(backbone, head, proj)


def set_trainable(model, args):
    """A: the backbone only (the locked classifier), unless --align-train-head; A and T: not the projection
    head, which only step P uses; the source stage and P: everything."""
    if args.stage == "align" and not args.align_train_head:
        freeze_all_but(model, lambda n: not n.startswith("decode_head."))
    if args.stage in ("align", "teach"):
        for q in model.auxiliary_head.parameters():
            q.requires_grad_(False)


def build_optimizer(model, args):
    """AdamW over the trainable parameters with DAFormer's custom_keys (a fresh one for every step)."""
    opt = torch.optim.AdamW(custom_key_groups(model, args.weight_decay, CUSTOM_KEYS), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay)
    init_lr(opt, args.lr)
    return opt


def summarize(model):
    return summary(model, {"backbone (MiT)": lambda n: n.startswith("backbone."),
                           "decode head (DAFormer)": lambda n: n.startswith("decode_head."),
                           "projection head": lambda n: n.startswith("auxiliary_head.")})


def read_segmentor_state(path, what):
    """The student's state dict from our checkpoints ('model'), DAFormer / mmseg ones ('state_dict' with
    backbone. / decode_head.) or ATP's (UDA wrapper: model.* the student, ema_model.* the teacher)."""
    sd = state_dict_of(load_checkpoint(path, what), f"{what} {path}", ("model", "state_dict"))
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def load_segmentor(model, path, what, allow_missing=()):
    sd = read_segmentor_state(path, what)
    load_state_dict_checked(model, sd, f"{what} {path}", allow_missing=allow_missing,
                            allow_unexpected=("auxiliary_head.",) if model.auxiliary_head is None else ())


# ----------------------------------------------------------------------------------------------------
# The EMA teacher (DAFormer / DACS mean teacher, spec section 2)

def make_teacher(student):
    """A copy of the student whose dropout and DropPath are off while it stays in train mode (BatchNorm
    uses batch statistics, as the release); it never gets gradients."""
    teacher = copy.deepcopy(student)
    for m in teacher.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):  # the head's dropout, MiT's DropPath
            m.p = 0.0
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher, student, it, alpha=0.999):
    """theta_tea <- a theta_tea + (1 - a) theta_stu with a = min(1 - 1/(it+1), alpha), parameters only."""
    a = min(1 - 1 / (it + 1), alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1 - a)


# ----------------------------------------------------------------------------------------------------
# Strong augmentation: DACS colour jitter (kornia 0.5 ColorJitter semantics) and Gaussian blur in torch

def _rgb_to_hsv(x, eps=1e-8):
    """(B, 3, H, W) in [0, 1] -> hue in radians [0, 2pi), saturation, value."""
    maxc, idx = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    s = delta / (maxc + eps)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = (maxc[:, None] - x).unbind(1)
    h = torch.stack([b - g, 2 * d + r - b, 4 * d + g - r], dim=1).gather(1, idx[:, None])[:, 0]
    h = ((h / d) / 6.0) % 1.0
    return 2 * math.pi * h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = (h / (2 * math.pi)) % 1.0 * 6
    hi = torch.floor(h6) % 6
    f = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sel = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros(h.shape[0], 3, *h.shape[1:], dtype=h.dtype, device=h.device)
    for k, (r, g, b) in enumerate(sel):
        m = (hi == k)[:, None]
        out = torch.where(m, torch.stack([r, g, b], dim=1), out)
    return out


def jitter_ops(x, fb, fc, fs, fh, order):
    """The four kornia 0.5 colour operations with given per-image factors (B,) in the given order, on
    [0, 1] images: brightness additive (x + fb - 1), contrast x * fc, saturation S * fs, hue H + 2 pi fh;
    each clamped to [0, 1]."""
    fb, fc, fs, fh = (f.view(-1, 1, 1).to(x.dtype) for f in (fb, fc, fs, fh))
    for op in order:
        if op == 0:
            x = (x + (fb - 1)[:, None]).clamp(0, 1)
        elif op == 1:
            x = (x * fc[:, None]).clamp(0, 1)
        elif op == 2:
            h, s, v = _rgb_to_hsv(x)
            x = _hsv_to_rgb(h, (s * fs).clamp(0, 1), v).clamp(0, 1)
        else:
            h, s, v = _rgb_to_hsv(x)
            x = _hsv_to_rgb(torch.remainder(h + fh * 2 * math.pi, 2 * math.pi), s, v).clamp(0, 1)
    return x


def color_jitter(x, strength=0.2):
    """kornia 0.5 ColorJitter(brightness=contrast=saturation=hue=strength): factors drawn per image,
    brightness / contrast / saturation in [1 - s, 1 + s], hue in [-s, s], one random order of the ops."""
    b = x.shape[0]
    u = lambda lo, hi: torch.rand(b, device=x.device) * (hi - lo) + lo  # noqa: E731
    lo, hi = 1 - strength, 1 + strength
    return jitter_ops(x, u(lo, hi), u(lo, hi), u(lo, hi), u(-strength, strength), torch.randperm(4).tolist())


def blur_kernel_size(n):
    """DACS: about 10 % of the side, made odd."""
    c = math.ceil(0.1 * n)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_blur(x, sigma):
    """kornia GaussianBlur2d with kernel sizes from blur_kernel_size and reflect padding, separable."""
    out = x
    for dim, n in ((2, x.shape[2]), (3, x.shape[3])):
        k = blur_kernel_size(n)
        t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
        if k % 2 == 0:
            t = t + 0.5
        w = torch.exp(-t ** 2 / (2 * sigma ** 2))
        w = (w / w.sum()).view(1, 1, -1, 1) if dim == 2 else (w / w.sum()).view(1, 1, 1, -1)
        pad = (0, 0, k // 2, (k - 1) // 2) if dim == 2 else (k // 2, (k - 1) // 2, 0, 0)
        c = out.shape[1]
        out = F.conv2d(F.pad(out, pad, mode="reflect"), w.expand(c, 1, *w.shape[2:]), groups=c)
    return out


class StrongAug:
    """One draw per iteration of the DACS decisions (jitter if u > 0.2, blur if u > 0.5); each call then
    draws its own jitter factors and blur sigma, as the release's strong_transform does."""

    def __init__(self, device, strength=0.2, jitter_p=0.2):
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.strength = strength
        self.jitter = torch.rand(()).item() > jitter_p
        self.blur = torch.rand(()).item() > 0.5

    def __call__(self, x):
        """x: normalised images (B, 3, H, W); returns a new tensor (never modifies x)."""
        if self.jitter:
            x = color_jitter(x * self.std / 255 + self.mean / 255, self.strength) * 255
            x = (x - self.mean) / self.std
        if self.blur:
            x = gaussian_blur(x, float(torch.empty(()).uniform_(0.15, 1.15)))
        return x


def class_mix_masks(labels):
    """DACS ClassMix: for each image a mask of the pixels whose label is in a random half (rounded up) of
    the classes present in the WHOLE batch (the release's quirk). labels (B, H, W) -> (B, 1, H, W)."""
    classes = torch.unique(labels)
    masks = []
    for lab in labels:
        pick = classes[torch.randperm(len(classes))[:(len(classes) + len(classes) % 2) // 2]]
        masks.append(torch.isin(lab, pick)[None].float())
    return torch.stack(masks)


def balanced_crop(label, crop, cat_max_ratio=0.75, trials=10):
    """ATP's class-balanced crop of a pseudo label (H, W): of 10 random boxes keep the one maximising
    sum log(count_c) over classes with more than one pixel, among boxes whose largest class covers
    less than cat_max_ratio (the first box when none qualifies)."""
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    best, best_box = -1.0, None
    for _ in range(trials):
        y = int(torch.randint(0, h - ch + 1, ()))
        x = int(torch.randint(0, w - cw + 1, ()))
        _, cnt = torch.unique(label[y:y + ch, x:x + cw], return_counts=True)
        score = 0.0
        if len(cnt) > 1 and cnt.max().item() / cnt.sum().item() < cat_max_ratio:
            score = cnt[cnt > 1].float().log().sum().item()
        if score > best:
            best, best_box = score, (y, y + ch, x, x + cw)
    return best_box


# ----------------------------------------------------------------------------------------------------
# Losses (spec sections 3, 4, 6; mmseg 0.x means run over every pixel, ignored ones counted as zeros)

def curriculum_entropy_loss(logits, num_classes, alpha=3.0, gamma=5.0):
    """Step A: 0.001 mean[(1 - H)^gamma H] - 1e-4 H(p_bar), H = entropy / log C per pixel, p_bar the
    exp(-alpha H)-weighted mean prediction over the N = B H W pixels (divided by N, not by the weights).
    The curriculum factor is not detached (pixels with H > 1/6 are pushed up), as the code."""
    p = logits.softmax(dim=1)
    ent = -(p * torch.log(p + 1e-30)).sum(dim=1) / math.log(num_classes)  # (B, H, W)
    loss = 0.001 * ((1 - ent) ** gamma * ent).mean()
    w = torch.exp(-alpha * ent).detach()
    p_bar = (w[:, None] * p).sum(dim=(0, 2, 3)) / ent.numel()  # (C,)
    diversity = -(p_bar * torch.log(p_bar + 1e-30)).sum() / math.log(num_classes)
    return loss - 1e-4 * diversity


def negative_loss(logits, tau=0.04):
    """Negative learning on the student's own prediction: -log(1 - sum of p_c below tau), mask detached,
    clamped to [1e-8, 1], mean over all pixels."""
    p = logits.softmax(dim=1)
    neg = ((p < tau).float() * p).sum(dim=1)
    return -(1 - neg).clamp(1e-8, 1).log().mean()


def ce_loss(logits, label, weight=None):
    """Pixel cross-entropy (ignore 255), optionally weighted per pixel, mean over every pixel."""
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    return (ce * weight if weight is not None else ce).mean()


def downscale_label(label, factor, min_ratio=0.75, num_classes=19):
    """SePiCo's majority downscaling: one-hot (ignore as an extra class), average pool by ``factor``,
    argmax; cells whose winner covers less than min_ratio, or is ignore, become 255. (B, H, W) -> (B, H/f, W/f)."""
    lab = label.clone()
    lab[lab == 255] = num_classes
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, factor).max(dim=1)
    out[(out == num_classes) | (ratio < min_ratio)] = 255
    return out


def _flatten_valid(feat, label, num_classes):
    """(B, D, h, w) features and (B, H, W) labels -> valid features (N, D) and labels (N,)."""
    lab = downscale_label(label, label.shape[-1] // feat.shape[-1], num_classes=num_classes)
    f = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
    lab = lab.reshape(-1)
    keep = lab != 255
    return f[keep], lab[keep]


def proto_contrastive_loss(feat, label, protos, num_classes, temp=100.0, reg_weight=1.0):
    """SePiCo ProtoCL: cross-entropy of the similarities to the class prototypes divided by temp (=100,
    so the logits are tiny), over the valid downscaled pixels, plus reg_weight * sum_c log softmax_c of
    the mean feature's similarities / (C log C)."""
    f, lab = _flatten_valid(feat, label, num_classes)
    if f.shape[0] == 0:
        return feat.sum() * 0.0
    loss = F.cross_entropy(f @ protos.t() / temp, lab)
    if reg_weight > 0:
        sim = f.mean(dim=0, keepdim=True) @ protos.t() / temp
        loss = loss + reg_weight * sim.log_softmax(dim=1).sum() / (num_classes * math.log(num_classes))
    return loss


class ProtoEstimator:
    """Running class means of the teacher's projected features (SePiCo ProtoEstimator, the mean part:
    with n_c new features of mean m_c and N_c seen before, mu_c <- (1 - w) mu_c + w m_c, w = n_c/(n_c+N_c))."""

    def __init__(self, dim, num_classes, device):
        self.mean = torch.zeros(num_classes, dim, device=device)
        self.count = torch.zeros(num_classes, device=device)

    @torch.no_grad()
    def update(self, feat, label):
        f, lab = _flatten_valid(feat, label, self.mean.shape[0])
        n = torch.bincount(lab, minlength=self.mean.shape[0]).float()
        sums = torch.zeros_like(self.mean).index_add_(0, lab, f)
        batch_mean = sums / n.clamp(min=1)[:, None]
        w = (n / (n + self.count)).nan_to_num(0.0)[:, None]
        self.mean = (1 - w) * self.mean + w * batch_mean
        self.count += n

    def state_dict(self):
        return {"mean": self.mean.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, s):
        self.mean, self.count = s["mean"].to(self.mean), s["count"].to(self.count)


# ----------------------------------------------------------------------------------------------------
# Data

def build_data(args, stage):
    """(source train, target train without labels, target val) for what ``stage`` needs."""
    pr = {**RECIPE, **PRESETS[args.preset]}
    test_tf = TestTransform(scale=args.test_scale)
    if stage == "source":
        src_tf = TrainTransform(scale=args.source_scale, crop=args.source_crop, ratio_range=None)
    # the target in training: resize, crop (none for ACDC: the class-balanced crop happens in the step),
    # flip; no photometric distortion, no ground truth (cat_max_ratio off)
    crop = pr["loader_crop"] if pr.get("loader_crop") else (args.crop, args.crop)
    tgt_tf = TrainTransform(scale=args.target_scale, crop=crop, ratio_range=None, cat_max_ratio=1.0,
                            photometric=False)
    if args.preset == "synthetic":
        n = args.num_samples or 96
        nv = max(8, n // 3)
        kw = dict(size=SYN_SIZE, seed=args.seed, objects=SYN_OBJECTS)
        src = SyntheticSeg(n, 6, split="train", transform=src_tf if stage == "source" else None, domain="source",
                           **kw)
        tgt = SyntheticSeg(n, 6, split="train", transform=tgt_tf, domain="target", with_labels=False, **kw)
        val = SyntheticSeg(nv, 6, split="val", transform=test_tf, domain="target", **kw)
        return (src if stage == "source" else None), tgt, val
    src = build_dataset(pr["source"], args.source_root, "train", src_tf) if stage == "source" else None
    tgt = None if stage == "source" else build_dataset(pr["target"], args.target_root, "train", tgt_tf,
                                                        with_labels=False)
    val = build_dataset(pr["target"], args.target_root, "val", test_tf)
    return src, tgt, val


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, indices):
        self.ds, self.indices = ds, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, (tuple, list)) else (key, None)
        return self.ds[(self.indices[i], seed) if seed is not None else self.indices[i]]


def sample_names(ds):
    if getattr(ds, "items", None):
        return [os.path.splitext(os.path.basename(p))[0] for p, _ in ds.items]
    return [f"{i:06d}" for i in range(len(ds))]


# ----------------------------------------------------------------------------------------------------
# Evaluation: whole image at the test scale, logits resized to the original size (ACDC: the prior)

def class_prior(num_classes, device):
    w = torch.log(torch.tensor(CITYSCAPES_FREQ[:num_classes], device=device))
    return (w.mean() - w) / w.std() * 0.16 + 1.0  # rare classes boosted; torch.std is unbiased


@torch.no_grad()
def infer(model, img, size, prior=None):
    logits = model(img)
    if prior is None:
        return resize(logits, size).softmax(dim=1)
    probs = logits.softmax(dim=1) * prior.view(1, -1, 1, 1)  # at the test resolution, then resized
    return resize(probs, size)


def metrics_line(m, subsets):
    out = {k: m[k] for k in ("mIoU", "mAcc", "aAcc")}
    if subsets:
        out["mIoU16"], out["mIoU13"] = subset_miou(m["IoU"], SYNTHIA16), subset_miou(m["IoU"], SYNTHIA13)
    return out


# ----------------------------------------------------------------------------------------------------
# The steps: one training iteration each (forward, the paper's loss, backward; the caller steps)

def step_source(model, batch, dev, **_):
    img, label = batch["img"].to(dev), batch["label"].to(dev)
    loss = ce_loss(model(img), label)
    loss.backward()
    return {"loss": loss}


def _weak_crops(teacher, img, crop):
    """ACDC: the loader gives whole 1280x720 images; crop each where the teacher's pseudo label is
    class-balanced (the release's pseudo RandomCrop), the label is then predicted again on the crop."""
    if img.shape[-2:] == tuple(crop):
        return img
    with torch.no_grad():
        lab = teacher(img).argmax(dim=1)
    boxes = [balanced_crop(lb, crop) for lb in lab]
    return torch.stack([im[:, y1:y2, x1:x2] for im, (y1, y2, x1, x2) in zip(img, boxes)])


def step_align(model, batch, dev, teacher, num_classes, crop, **_):
    img = _weak_crops(teacher, batch["img"].to(dev), crop)
    aug = StrongAug(dev)
    loss = curriculum_entropy_loss(model(aug(img)), num_classes)
    loss.backward()
    return {"loss": loss}


def step_teach(model, batch, dev, teacher, crop, **_):
    weak = _weak_crops(teacher, batch["img"].to(dev), crop)
    with torch.no_grad():
        pseudo = teacher(weak).softmax(dim=1).argmax(dim=1)  # every pixel, no threshold (the code)
    logits = model(StrongAug(dev)(weak))
    l_ppl, l_npl = ce_loss(logits, pseudo), negative_loss(logits)
    (l_ppl + l_npl).backward()
    return {"loss": l_ppl + l_npl, "loss_ce": l_ppl, "loss_neg": l_npl}


def step_propagate(model, batch, dev, teacher, crop, protos, it, start_contrast, num_classes, ignore_top, ignore_bottom,
                   threshold=0.968, **_):
    easy, hard = batch
    x_e = _weak_crops(teacher, easy["img"].to(dev), crop)
    x_h = _weak_crops(teacher, hard["img"].to(dev), crop)
    with torch.no_grad():
        y_e = teacher(x_e).argmax(dim=1)
        p_h, y_h = teacher(x_h).softmax(dim=1).max(dim=1)
        q = (p_h >= threshold).float().mean()  # one confident fraction for the batch (DACS)
        w_h = torch.full_like(p_h, q.item())
        w_h[:, :ignore_top] = 0
        if ignore_bottom:
            w_h[:, -ignore_bottom:] = 0
        # prototypes from the teacher's features of the weak (normalised) easy images
        protos.update(teacher.project(x_e), y_e)
    aug = StrongAug(dev)
    s_e, s_h = aug(x_e), aug(x_h)
    logits_e = model(s_e)
    l_e = ce_loss(logits_e, y_e) + negative_loss(logits_e)
    out = {"loss_easy": l_e}
    total = l_e
    if it >= start_contrast:
        y_c = y_h.clone()
        y_c[w_h == 0] = 255
        l_c = proto_contrastive_loss(model.project(s_h), y_c, protos.mean, num_classes)
        out["loss_contrast"] = l_c
        total = total + l_c
    m = class_mix_masks(y_e)  # (B, 1, H, W)
    # the mixed images get the strong augmentation again, image by image (its own factors and sigma)
    x_m = torch.cat([aug(x) for x in (m * s_e + (1 - m) * s_h).split(1)])
    y_m = torch.where(m[:, 0] > 0, y_e, y_h)
    w_m = m[:, 0] + (1 - m[:, 0]) * w_h
    logits_m = model(x_m)
    l_m = ce_loss(logits_m, y_m, w_m) + negative_loss(logits_m)
    out["loss_mix"] = l_m
    total = total + l_m
    total.backward()
    out["loss"] = total
    return out


STEP_FN = {"source": step_source, "align": step_align, "teach": step_teach, "propagate": step_propagate}


# ----------------------------------------------------------------------------------------------------
# Entropy ranking (spec section 5)

@torch.no_grad()
def rank(args, info, model, target, num_classes):
    """Mean of -p log2 p / log2 C over classes and pixels of every target training image (whole image
    at the test scale, eval mode), ascending: the first easy_ratio are easy. Writes ranking.json."""
    tf = TestTransform(scale=args.test_scale)
    target.transform = tf
    model.eval()
    idx = list(range(info.rank, len(target), info.world_size))
    scores = []
    for i in tqdm(idx, desc="rank", disable=not info.is_main):
        p = model(target[i]["img"][None].to(info.device)).softmax(dim=1)
        scores.append((i, (-p * torch.log2(p + 1e-30) / math.log2(num_classes)).mean().item()))
    order = sorted((s for part in D.gather_objects(scores) for s in part), key=lambda t: (t[1], t[0]))
    n_easy = int(len(order) * args.easy_ratio)
    names = sample_names(target)
    out = {"preset": args.preset, "num_images": len(order), "easy_ratio": args.easy_ratio,
           "easy": [names[i] for i, _ in order[:n_easy]], "hard": [names[i] for i, _ in order[n_easy:]],
           "scores": {names[i]: s for i, s in order}}
    if info.is_main:
        os.makedirs(args.work_dir, exist_ok=True)
        path = os.path.join(args.work_dir, "ranking.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"ranked {len(order)} target images: {n_easy} easy, {len(order) - n_easy} hard -> {path}")
    return out


def read_ranking(path, target):
    """The easy / hard index lists of ranking.json, checked against the target training split."""
    if not os.path.isfile(path):
        raise UserError(f"--ranking {path} not found; write it with --stage rank (it holds the easy / hard lists)")
    try:
        with open(path) as f:
            r = json.load(f)
        easy, hard = list(r["easy"]), list(r["hard"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--ranking {path} is not a ranking.json of --stage rank ({type(e).__name__}: {e})") from None
    names = sample_names(target)
    where = {n: i for i, n in enumerate(names)}
    missing = [n for n in easy + hard if n not in where]
    if missing or len(easy) + len(hard) != len(names) or not easy or not hard:
        raise UserError(f"--ranking {path} does not match the target training split ({len(names)} images; the "
                        f"file lists {len(easy)} easy + {len(hard)} hard, {len(missing)} unknown, e.g. "
                        f"{missing[:2]}); rank this target with --stage rank")
    return [where[n] for n in easy], [where[n] for n in hard]


# ----------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    args = get_args(argv)
    num_classes = 6 if args.preset == "synthetic" else 19
    with_proj = args.stage != "source"
    if args.summary:
        with torch.device("meta"):
            model = build_model(args, num_classes, with_proj)
        summarize(model)
        return None
    info = D.setup(args.device)
    result = run(args, info, num_classes)
    D.cleanup()
    return result


def run(args, info, num_classes):
    dev = info.device
    training = not args.eval_only and args.stage != "rank"
    book = RunBook(args, info) if training else None  # the work dir: refuse clobbering, lock, resume checks
    D.seed_everything(args.seed + info.rank)
    pr = {**RECIPE, **PRESETS[args.preset]}
    source, target, val = build_data(args, args.stage)
    if not args.skip_data_check:
        check_files([val] if args.eval_only else [source, target, val], info)
    model = build_model(args, num_classes, with_proj=args.stage != "source")
    prior = class_prior(num_classes, dev) if args.class_prior else None
    pal_name = "cityscapes" if num_classes == 19 else "synthetic"
    palette, names = get_palette(pal_name, num_classes), class_names(pal_name, num_classes)
    val_loader = D.data_loader(val, min(args.workers, 2), batch_size=1, collate_fn=collate_single,
                               sampler=D.ShardSampler(len(val), info.rank, info.world_size))

    def run_eval(tag, net):
        vis = overlay_writer(os.path.join(args.work_dir, "vis", tag), val, palette, args.vis, names) \
            if info.is_main and args.vis else None
        m = evaluate(net, val_loader, num_classes, dev, lambda mm, x, size: infer(mm, x, size, prior),
                     info.is_main, vis)
        return {**metrics_line(m, pr.get("subsets")), "IoU": m["IoU"]}

    if args.eval_only:
        path = args.checkpoint or os.path.join(args.work_dir, "best.pt")
        load_segmentor(model, path, "--checkpoint", allow_missing=("auxiliary_head.",))
        m = run_eval("eval", model.to(dev))
        if info.is_main:
            print("  ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "IoU"))
        return m

    if args.stage == "rank":
        load_segmentor(model, args.init, "--init", allow_missing=("auxiliary_head.",))
        return rank(args, info, model.to(dev), target, num_classes)

    if not args.resume:
        if args.stage == "source":
            if args.pretrained:
                load_mit_pretrained(model.backbone, args.pretrained)
            elif args.preset != "synthetic" and info.is_main:
                print("note: no --pretrained: MiT starts from scratch (the recipe starts from mit_b5.pth)")
        else:  # the previous step's student; a source model has no projection head yet (its init stays)
            load_segmentor(model, args.init, "--init", allow_missing=("auxiliary_head.",))
    model.to(dev)
    D.broadcast_params(model)  # one model on every process: the random inits differ (seeded per rank)
    if info.distributed and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    set_trainable(model, args)
    opt = build_optimizer(model, args)

    teacher = make_teacher(model) if args.stage != "source" else None
    protos = ProtoEstimator(args.proj_channels, num_classes, dev) if args.stage == "propagate" else None
    ck = book.resume(model, opt)
    if ck is not None:
        if teacher is not None:
            teacher.load_state_dict(ck["teacher"])
        if protos is not None:
            protos.load_state_dict(ck["protos"])
    start = book.start

    # data: source batches, or target batches (P: easy and hard from two independent loaders)
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size
    if args.stage == "propagate":
        easy_idx, hard_idx = read_ranking(args.ranking, target)
        easy = D.train_batches(_Subset(target, easy_idx), per_rank, info, args.seed, start, args.workers)
        hard = D.train_batches(_Subset(target, hard_idx), per_rank, info, args.seed + 1, start, args.workers)
        batches = zip(easy, hard)
    else:
        data = source if args.stage == "source" else target
        if len(data) == 0:
            raise UserError("the training split is empty")
        batches = D.train_batches(data, per_rank, info, args.seed, start, args.workers)
    if info.is_main:
        print(f"{args.stage} on {args.preset}: {count_params(model, True):,} trainable of {count_params(model):,} "
              f"parameters; {args.iters} iterations at batch {args.batch_size} ({info.world_size} process(es) on {dev})")

    step_fn = STEP_FN[args.stage]
    model.train()
    stop = min(args.iters, args.stop_at or args.iters)
    bar = tqdm(range(start, stop), initial=start, total=args.iters, disable=not info.is_main, desc=args.stage)
    t0 = time.time()
    for it in bar:
        D.seed_step(args.seed, it, info.rank)  # augmentation draws, dropout, DropPath: exact on resume
        if args.stage == "align" and not args.align_train_head:
            model.decode_head.eval()  # the locked classifier: frozen BN statistics, no dropout
        set_lr(opt, warmup_poly_mmcv(it, args.iters, args.warmup))
        if teacher is not None:
            if it == 0:
                teacher.load_state_dict(model.state_dict())
            else:
                ema_update(teacher, model, it)
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        parts = step_fn(model, batch, dev, teacher=teacher, protos=protos, it=it, num_classes=num_classes,
                        crop=(args.crop, args.crop), start_contrast=args.start_contrast,
                        ignore_top=args.ignore_top, ignore_bottom=args.ignore_bottom)
        if not torch.isfinite(parts["loss"]):
            raise RuntimeError(f"loss is {parts['loss'].item()} at iteration {it}; stopping without saving")
        D.average_gradients(model)
        opt.step()
        D.broadcast_params(model, buffers_only=True)  # rank 0's BatchNorm statistics, as DDP's broadcast_buffers

        done = it + 1
        if info.is_main and (done % args.log_interval == 0 or done == stop):
            rec = {"iter": done, "lr": max(g["lr"] for g in opt.param_groups),
                   "sec_per_iter": (time.time() - t0) / (done - start), **{k: v.item() for k, v in parts.items()}}
            book.log(**rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        due = done % args.eval_interval == 0 or done == args.iters
        book.step_end(done, model, opt, save=done % args.ckpt_interval == 0 or done == stop,
                      evaluate=(lambda: run_eval(f"iter_{done}", model)) if due else None,
                      extra=lambda: {"teacher": teacher.state_dict() if teacher is not None else None,
                                     "protos": protos.state_dict() if protos is not None else None})
    bar.close()
    book.finish()
    return book.last_metrics


if __name__ == "__main__":
    cli(main)
