"""ProPETL: Progressive Parameter-Efficient Transfer Learning for Semantic Segmentation (ICLR 2025).

Zhou, Wang, Zheng, Huang. Official code: github.com/weeknan/ProPETL (MMSegmentation 1.1). This file is
the whole method in plain PyTorch: a frozen Swin-L, an AdaptFormer adapter in every block trained on a
*midstream* task (predict each image's class-area histogram), then a *downstream* stage where those
adapters are frozen and a second adapter, fed the concatenation of the plain and the midstream-adapted
activations, is trained with UperNet ("Decoupled Structured Adaptation"). Spec: shared/papers/propetl.md.

    # the paper's recipe on PASCAL VOC 2012 (Swin-L IN-22k, 640 crops, batch 16 = 2 GPUs x 8):
    torchrun --nproc_per_node=2 propetl.py --stage mid  --dataset voc --data-root data/VOCdevkit/VOC2012 \
        --pretrained pretrain/swin_large_patch4_window7_224_22k.pth --work-dir work_dirs/voc_mid
    torchrun --nproc_per_node=2 propetl.py --stage down --dataset voc --data-root data/VOCdevkit/VOC2012 \
        --pretrained pretrain/swin_large_patch4_window7_224_22k.pth \
        --mid-checkpoint work_dirs/voc_mid/last.pt --work-dir work_dirs/voc_down
    # baselines of the paper's comparison: --stage full (full fine-tuning), --stage adaptformer
    # evaluate:  python propetl.py --stage down --dataset voc --data-root ... --eval-only --checkpoint best.pt
    # one process (GPU if present, else CPU): python propetl.py ... ; several nodes: torchrun's own flags.

Choices where the official code is odd (all reproduced, see spec section 7):
- the midstream target is the class-area histogram of the padded 640x640 label, ignore/padding pixels in
  the denominator (it sums to the labelled fraction, not to 1); no norm before the pooled head;
- the downstream out-norms norm0..3 are not in the checkpoint: they stay weight 1 / bias 0 and frozen;
- ADE20K downstream trains on 512 crops padded to 640 (the released config's effective behaviour);
- the midstream adapter's output only feeds the new adapter, it is not added to the residual stream;
  its dropout and the backbone's DropPath stay active while training (modules stay in train mode);
- the best checkpoint is chosen on the evaluation split every --eval-interval iterations, as
  mmseg's save_best='mIoU' does; log.jsonl keeps every evaluation, so the last one is reported too.
Cityscapes has no released ProPETL config: its preset is ours (mmseg's Swin Cityscapes schedule).
"""
import argparse
import functools
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist as D
from common.io import (ArgumentParser, UserError, check_flags, cli, load_checkpoint, load_state_dict_checked,
                       state_dict_of, strip_prefix, work_dir_problem)
from common.palettes import class_names, get_palette
from common.seg_data import DATASETS, SyntheticSeg, TestTransform, TrainTransform, build_dataset, check_files
from common.segment import EncoderDecoder, collate_single, evaluate, overlay_writer, pad_batch, predict
from common.swin import SWIN_SIZES, SwinBlock, SwinTransformer, convert_swin_state_dict, load_swin_pretrained
from common.train import (RunBook, count_params, freeze_all_but, init_lr, param_groups, set_lr, summary,
                          warmup_poly)
from common.upernet import FCNHead, UPerHead

# ----------------------------------------------------------------------------------------------------
# Presets: the released configs (spec sections 2.5, 2.6, 3.4, 5). Every value can be overridden by a flag.

PRESETS = {
    # dataset: classes, adapter reduction r, midstream and downstream recipes
    "voc": dict(r=24, test_scale=(2048, 512),
                mid=dict(iters=20_000, warmup=250, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640, pad=640),
                down=dict(iters=40_000, warmup=500, lr=1e-4, weight_decay=0.01, scale=(2048, 512), crop=640, pad=640)),
    "ade20k": dict(r=24, test_scale=(2048, 512),
                   mid=dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2560, 640), crop=640, pad=640),
                   down=dict(iters=160_000, warmup=1500, lr=3e-4, weight_decay=0.02, scale=(2048, 512), crop=512,
                             pad=640)),
    "coco_stuff10k": dict(r=48, test_scale=(2048, 512),
                          mid=dict(iters=40_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640,
                                   pad=640),
                          down=dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 512), crop=640,
                                    pad=640)),
    # not released by the authors: mmseg's Swin Cityscapes recipe (512x1024 crops, 80k) with VOC's lr
    "cityscapes": dict(r=24, test_scale=(2048, 1024),
                       mid=dict(iters=40_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 1024), crop=(512, 1024),
                                pad=(512, 1024)),
                       down=dict(iters=80_000, warmup=1500, lr=1e-4, weight_decay=0.01, scale=(2048, 1024),
                                 crop=(512, 1024), pad=(512, 1024))),
    # no files: the quick start and the tests (128x128 images resized to 96, pass a small Swin by flags)
    "synthetic": dict(r=8, test_scale=(96, 96),
                      mid=dict(iters=300, warmup=20, lr=1e-3, weight_decay=0.01, scale=(96, 96), crop=64, pad=64),
                      down=dict(iters=300, warmup=20, lr=1e-3, weight_decay=0.01, scale=(96, 96), crop=64, pad=64)),
}
PRESETS["voc_aug"] = PRESETS["voc"]
# full fine-tuning baseline: mmseg's UperNet + Swin recipe (AdamW 6e-5, wd 0.01, warmup 1500), downstream schedule
FULL_FT = dict(lr=6e-5, weight_decay=0.01, warmup=1500)
PALETTE_OF = {"voc": "voc", "voc_aug": "voc", "ade20k": "ade20k", "coco_stuff10k": "coco_stuff",
              "cityscapes": "cityscapes"}
NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm")  # mmengine decay_mult=0 keys


def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", required=True, choices=["mid", "down", "full", "adaptformer"],
      help="mid: adapters on the class-histogram task; down: ProPETL segmentation (needs --mid-checkpoint);\n"
           "full: full fine-tuning baseline; adaptformer: one adapter trained directly on segmentation")
    a("--dataset", default="synthetic", choices=sorted(PRESETS), help="dataset and its preset recipe")
    a("--data-root", default=None, help="dataset root in its official layout (not needed for synthetic)")
    a("--work-dir", default="work_dirs/propetl", help="holds last.pt, best.pt, log.jsonl and vis/")
    a("--pretrained", default=None, help="Swin checkpoint: official Microsoft (.pth, 'model'), timm or mmseg layout")
    a("--mid-checkpoint", default=None, help="--stage down: the midstream run's last.pt (or the official iter_*.pth)")
    # backbone
    a("--swin", default="large", choices=sorted(SWIN_SIZES), help="Swin size (paper: large, IN-22k)")
    a("--embed-dim", type=int, default=None, help="override the Swin width (small runs)")
    a("--depths", type=int, nargs=4, default=None, help="override the Swin depths")
    a("--num-heads", type=int, nargs=4, default=None, help="override the Swin heads")
    a("--window-size", type=int, default=7, help="attention window (pre-training used 7)")
    a("--drop-path", type=float, default=0.3, help="stochastic depth, linear over the blocks (paper 0.3)")
    a("--reduction", type=int, default=None, help="adapter reduction r: bottleneck = C // r (preset: 24, COCO 48)")
    a("--head-channels", type=int, default=512, help="UperNet channels (paper 512; the FCN aux head has half)")
    # schedule
    a("--iters", type=int, default=None, help="iterations (preset per stage)")
    a("--batch-size", type=int, default=16, help="global batch over all processes (paper 16)")
    a("--lr", type=float, default=None, help="AdamW lr (preset per stage)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay (preset per stage)")
    a("--warmup", type=int, default=None, help="linear warmup iterations from 1e-6 x lr (preset)")
    a("--crop", type=int, nargs="+", default=None, help="training crop (h [w])")
    a("--scale", type=int, nargs=2, default=None, help="random-resize base scale (long short)")
    a("--test-scale", type=int, nargs=2, default=None, help="test keep-ratio resize (long short)")
    a("--eval-mode", default="whole", choices=["whole", "slide"], help="test inference (the configs: whole)")
    a("--eval-interval", type=int, default=1000, help="evaluate and keep the best every N iterations")
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
    a("--checkpoint", default=None, help="with --eval-only: the checkpoint to evaluate")
    a("--summary", action="store_true", help="print parameter counts per module group and exit (no data)")
    a("--vis", type=int, default=8, help="colour overlays written to work-dir/vis per evaluation")
    a("--stop-at", type=int, default=None, help="stop after this iteration as if interrupted (tests --resume)")
    args = p.parse_args(argv)
    # fill what the flags left open from the preset
    preset = PRESETS[args.dataset]
    stage = preset["mid"] if args.stage == "mid" else preset["down"]
    if args.stage == "full" and args.dataset != "synthetic":
        stage = {**stage, **FULL_FT}
    args.reduction = args.reduction or preset["r"]
    for k in ("iters", "lr", "weight_decay", "warmup", "scale"):
        if getattr(args, k) is None:
            setattr(args, k, stage[k])
    args.crop, args.pad = _pair(args.crop or stage["crop"]), _pair(stage["pad"])
    args.pad = tuple(max(c, q) for c, q in zip(args.crop, args.pad))  # pad the batch to at least the crop
    args.test_scale = tuple(args.test_scale or preset["test_scale"])
    if args.dataset != "synthetic" and not args.summary and not args.data_root:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    validate(p, args)
    return args


def validate(p, args):
    """Every flag a user can get wrong, refused with parser.error before any work."""
    check_flags(p, args, positive=("iters", "batch_size", "lr", "eval_interval", "ckpt_interval", "log_interval",
                                   "crop", "scale", "test_scale", "reduction", "head_channels", "window_size",
                                   "embed_dim", "depths", "num_heads", "num_samples", "stop_at"),
                non_negative=("weight_decay", "warmup", "workers", "vis"), below_one=("drop_path",))
    if len(args.crop) != 2 or any(c < 1 for c in args.crop):
        p.error(f"--crop {' '.join(map(str, args.crop))}: expected one or two positive sizes (h [w])")
    if args.num_classes is not None and args.num_classes < 2:
        p.error(f"--num-classes {args.num_classes}: expected 2 or more (background and one class)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    sync_bn = world > 1 and args.device != "cpu" and torch.cuda.is_available()
    if args.stage != "mid" and not args.eval_only and args.batch_size // world < 2 and not sync_bn:
        p.error(f"--batch-size {args.batch_size}: {args.batch_size // world} image(s) per process, but BatchNorm in "
                "the UperNet and FCN heads needs 2 or more per step (SyncBN pools them on GPUs under torchrun)")
    if args.eval_only and (args.stage == "mid" or args.resume):
        p.error("--eval-only evaluates a segmentation checkpoint: not with --stage mid, nor with --resume")
    for flag in ("pretrained", "mid_checkpoint", "checkpoint"):
        path = getattr(args, flag)
        if path and not args.summary and not os.path.isfile(path):
            p.error(f"--{flag.replace('_', '-')} {path}: file not found")
    if not args.summary:
        problem = work_dir_problem(args.work_dir)
        if problem:
            p.error(f"--work-dir {args.work_dir}: {problem}")


def _pair(v):
    """640 -> (640, 640); [512] -> (512, 512); [512, 1024] -> (512, 1024)."""
    v = [v] if isinstance(v, int) else list(v)
    return tuple(v * 2 if len(v) == 1 else v[:2])


# ----------------------------------------------------------------------------------------------------
# Model: the adapter, the two block variants, the midstream classifier (spec sections 2.1-2.3, 3.1)

class Adapter(nn.Module):
    """AdaptFormer bottleneck: down -> ReLU -> dropout(0.1) -> up, times a fixed 0.1. The up-projection
    starts at zero ("lora" init), so a new adapter changes nothing at step 0."""

    def __init__(self, in_dim, bottleneck, out_dim=None, scale=0.1, dropout=0.1):
        super().__init__()
        self.down_proj = nn.Linear(in_dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, out_dim or in_dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.zeros_(self.down_proj.bias)  # weight: PyTorch's default kaiming-uniform(a=sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x):
        return self.up_proj(self.dropout(F.relu(self.down_proj(x)))) * self.scale


class MidBlock(SwinBlock):
    """Swin block + the midstream adapter, parallel to the MLP, reading the post-attention stream; its
    output bypasses DropPath. Also the plain AdaptFormer baseline block."""

    def __init__(self, dim, *args, r=24, **kw):
        super().__init__(dim, *args, **kw)
        self.adaptmlp = Adapter(dim, dim // r)

    def forward(self, x, hw):
        x = x + self.drop_path(self.window_msa(self.norm1(x), hw))
        a = self.adaptmlp(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x + a


class TwoConcatBlock(MidBlock):
    """Downstream block ("two_concat"): the frozen midstream adapter's result r only feeds the new adapter,
    which reads concat(plain, midstream-adapted) and alone writes to the residual stream."""

    def __init__(self, dim, *args, r=24, **kw):
        super().__init__(dim, *args, r=r, **kw)
        self.adaptmlp_train = Adapter(2 * dim, 2 * (dim // r), out_dim=dim)

    def forward(self, x, hw):
        x = x + self.drop_path(self.window_msa(self.norm1(x), hw))
        a = self.adaptmlp(x)                                       # frozen midstream adapter
        x = x + self.drop_path(self.mlp(self.norm2(x)))            # x_f: the plain frozen block's output
        d = self.adaptmlp_train(torch.cat([x, x + a], dim=-1))     # (B, L, 2C) -> (B, L, C)
        return x + d


class MidstreamModel(nn.Module):
    """Frozen Swin with adapters + the global head: mean of the RAW stage-4 tokens (no LayerNorm) ->
    Linear(C, C) -> Linear(C, K), no activation between (spec 2.3)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        c = backbone.num_features[-1]
        self.final_proj = nn.Linear(c, c)
        self.final_proj_cls = nn.Linear(c, num_classes)

    def forward(self, img):
        tokens, _ = self.backbone.forward_tokens(img)[-1]          # (B, h*w, C) of stage 4
        return self.final_proj_cls(self.final_proj(tokens.mean(dim=1)))  # (B, K)


def histogram_target(label, num_classes):
    """Soft class-area target: t_k = #{pixels == k} / (H*W) for k < K over the padded label; ignored and
    padding pixels (255) count in the denominator only (spec 2.3)."""
    b = label.shape[0]
    flat = label.reshape(b, -1)
    valid = flat < num_classes
    counts = torch.zeros(b, num_classes, dtype=torch.float32, device=label.device)
    counts.scatter_add_(1, flat.clamp(max=num_classes - 1) * valid, valid.float())
    return counts / flat.shape[1]


def soft_cross_entropy(logits, target):
    """-(1/B) sum_b sum_k t_bk log softmax(z_b)_k (F.cross_entropy with probability targets)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def build_model(args, num_classes):
    """The network of each stage; every parameter's requires_grad is set as the paper trains it."""
    size = dict(SWIN_SIZES[args.swin])
    for k, v in (("embed_dim", args.embed_dim), ("depths", args.depths), ("num_heads", args.num_heads)):
        if v is not None:
            size[k] = tuple(v) if isinstance(v, list) else v
    block = {"mid": MidBlock, "adaptformer": MidBlock, "down": TwoConcatBlock, "full": SwinBlock}[args.stage]
    if block is not SwinBlock:
        block = functools.partial(block, r=args.reduction)
    backbone = SwinTransformer(**size, window_size=args.window_size, drop_path_rate=args.drop_path, block=block)
    if args.stage == "mid":
        model = MidstreamModel(backbone, num_classes)
        trainable = lambda n: "adaptmlp" in n or "final_proj" in n
    else:
        c = backbone.num_features
        model = EncoderDecoder(backbone, UPerHead(c, args.head_channels, num_classes),
                               FCNHead(c[2], args.head_channels // 2, num_classes), aux_weight=0.4)
        trainable = {"down": lambda n: "adaptmlp_train" in n or not n.startswith("backbone."),
                     "adaptformer": lambda n: "adaptmlp" in n or not n.startswith("backbone."),
                     "full": lambda n: True}[args.stage]
    freeze_all_but(model, trainable)
    return model


def load_weights(args, model):
    """Pre-trained Swin into the backbone; for --stage down, the midstream adapters on top (frozen)."""
    if args.pretrained:
        load_swin_pretrained(model.backbone, args.pretrained, allow_missing=("adaptmlp",))
    elif args.dataset != "synthetic" and int(os.environ.get("RANK", "0")) == 0:
        print("warning: no --pretrained: the Swin backbone starts from random weights (the paper uses "
              "swin_large_patch4_window7_224_22k.pth)", file=sys.stderr)
    if args.stage == "down":
        source = f"--mid-checkpoint {args.mid_checkpoint}"  # given: run() checks it first
        sd = from_official(state_dict_of(load_checkpoint(args.mid_checkpoint, "--mid-checkpoint"), source))
        mid = {k[len("backbone."):]: v for k, v in sd.items() if ".adaptmlp." in k and k.startswith("backbone.")}
        if not mid:
            raise UserError(f"{source} holds no midstream adapter weights (keys '...adaptmlp...'); is it the "
                            "midstream run's checkpoint?")
        load_state_dict_checked(model.backbone, mid, source, expect=lambda k: ".adaptmlp." in k)


def from_official(sd):
    """The official mmseg checkpoints (iter_*.pth: 'state_dict' with mmseg's Swin names stages.i.blocks.j
    .attn.w_msa / ffn.layers / patch_embed.projection and the unfold channel order of patch merging,
    converted by common.swin) -> this file's names. The official midstream code keeps its head inside the
    backbone (backbone.final_proj*): moved to the top level, as MidstreamModel has it. Ours pass unchanged."""
    sd = strip_prefix(sd, "module.")
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not any(k.startswith(("stages.", "patch_embed.projection.")) for k in bb):
        return sd
    out = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    out.update({k: v for k, v in bb.items() if k.startswith("final_proj")})
    swin = convert_swin_state_dict({k: v for k, v in bb.items() if not k.startswith("final_proj")})
    out.update({"backbone." + k: v for k, v in swin.items()})
    return out


def summarize(model):
    groups = {
        "backbone (Swin)": lambda n: n.startswith("backbone.") and "adaptmlp" not in n,
        "midstream adapters": lambda n: ".adaptmlp." in n,
        "downstream adapters": lambda n: ".adaptmlp_train." in n,
        "midstream head": lambda n: n.startswith("final_proj"),
        "decode head (UperNet)": lambda n: n.startswith("decode_head."),
        "auxiliary head (FCN)": lambda n: n.startswith("auxiliary_head."),
    }
    return summary(model, groups)


# ----------------------------------------------------------------------------------------------------
# Data

def build_data(args, num_classes=None):
    train_tf = TrainTransform(scale=args.scale, crop=args.crop)
    test_tf = TestTransform(scale=args.test_scale)
    if args.dataset == "synthetic":
        k = args.num_classes or 6
        n = args.num_samples or 64
        train = SyntheticSeg(n, k, size=(128, 128), split="train", transform=train_tf, seed=args.seed)
        val = SyntheticSeg(max(8, n // 4), k, size=(128, 128), split="val", transform=test_tf, seed=args.seed)
    else:
        train = build_dataset(args.dataset, args.data_root, "train", train_tf)
        val = build_dataset(args.dataset, args.data_root, "val", test_tf)
    return train, val




# ----------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = get_args(argv)
    num_classes = DATASETS[args.dataset]["num_classes"] if args.dataset != "synthetic" else (args.num_classes or 6)
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
    per_rank = args.batch_size // info.world_size
    if args.stage == "down" and not (args.mid_checkpoint or args.resume or args.eval_only):
        raise UserError("--stage down needs --mid-checkpoint (the midstream run's last.pt or the official iter_*.pth)")
    # refuses a work dir holding a run unless --resume, locks it, checks a resume's flags: before any work
    book = None if args.eval_only else RunBook(args, info)
    train_set, val_set = build_data(args)
    if len(train_set) == 0:
        raise UserError(f"--data-root {args.data_root}: the training split is empty")
    if not args.skip_data_check:
        check_files([val_set] if args.eval_only else [train_set, val_set], info)

    model = build_model(args, num_classes)
    if args.eval_only:
        ck_path = args.checkpoint or os.path.join(args.work_dir, "best.pt")
        source = f"--checkpoint {ck_path}"
        sd = from_official(state_dict_of(load_checkpoint(ck_path, "--checkpoint"), source, ("model", "state_dict")))
        load_state_dict_checked(model, sd, source)
    elif not args.resume:
        load_weights(args, model)
    model.to(dev)
    if info.distributed and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN as the configs (GPU only)

    groups = param_groups(model, args.weight_decay, NO_DECAY)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    init_lr(opt, args.lr)

    val_loader = D.data_loader(val_set, min(args.workers, 2), batch_size=1, collate_fn=collate_single,
                               sampler=D.ShardSampler(len(val_set), info.rank, info.world_size))
    palette = get_palette(PALETTE_OF.get(args.dataset, "synthetic"), num_classes)

    names = class_names(PALETTE_OF.get(args.dataset, "synthetic"), num_classes)

    def run_eval(tag):
        vis = overlay_writer(os.path.join(args.work_dir, "vis", tag), val_set, palette, args.vis, names) \
            if info.is_main and args.vis else None
        infer = functools.partial(_infer, num_classes=num_classes, mode=args.eval_mode, crop=args.crop,
                                  stride=tuple(c * 2 // 3 for c in args.crop))
        return evaluate(D.unwrap(model), val_loader, num_classes, dev, infer, info.is_main, vis)

    if args.eval_only:
        m = run_eval("eval")
        if info.is_main:
            print(f"mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  aAcc {m['aAcc']:.2f}")
        return m

    book.resume(model, opt)
    start = book.start
    if info.is_main:
        print(f"stage {args.stage} on {args.dataset}: {count_params(model, True):,} trainable of "
              f"{count_params(model):,} parameters; {args.iters} iterations at batch {args.batch_size} "
              f"({info.world_size} process(es) on {dev})")
    log = book.log
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    loader = D.train_batches(train_set, per_rank, info, args.seed, start, args.workers)
    model.train()
    stop = min(args.iters, args.stop_at or args.iters)
    bar = tqdm(range(start, stop), initial=start, total=args.iters, disable=not info.is_main, desc=args.stage)
    t0 = time.time()
    for it in bar:
        D.seed_step(args.seed, it, info.rank)  # dropout / DropPath: exact on resume
        set_lr(opt, warmup_poly(it, args.iters, args.warmup))
        batch = next(loader)
        img, label = pad_batch(batch["img"].to(dev), batch["label"].to(dev), args.pad)
        if args.stage == "mid":
            loss = soft_cross_entropy(model(img), histogram_target(label, num_classes))
            parts = {}
        else:
            loss, parts = model(img, label)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at iteration {it}; stopping without saving")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        done = it + 1
        if info.is_main and (done % args.log_interval == 0 or done == stop):
            rec = {"iter": done, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                   "sec_per_iter": (time.time() - t0) / (done - start)}
            rec.update({k: v.item() for k, v in parts.items()})
            log(**rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        evaluating = args.stage != "mid" and (done % args.eval_interval == 0 or done == args.iters)
        book.step_end(done, model, opt, save=done % args.ckpt_interval == 0 or done == stop,
                      evaluate=(lambda: run_eval(f"iter_{done}")) if evaluating else None)
    bar.close()
    book.finish()
    return book.last_metrics




def _infer(model, img, size, num_classes, mode, crop, stride):
    return predict(model, img, size, num_classes, mode=mode, crop=crop, stride=stride)




if __name__ == "__main__":
    cli(main)
