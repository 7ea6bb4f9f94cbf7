"""V-PETL: Towards a Unified View on Visual Parameter-Efficient Transfer Learning (Yu et al., arXiv 2210.00788).

Official code: github.com/bruceyo/V-PETL (main.py, engine_finetune.py, models/video_swin_transformer_patt.py,
datasets/). Spec: shared/papers/vpetl.md. A frozen Video Swin-B (Kinetics-pretrained) gets, in each of its
24 blocks, an AdaptFormer adapter beside the MLP (--ffn-adapt) and PATT, a parallel bottleneck
Down -> tanh -> Up on the attention input whose output, scaled, is ADDED to the keys and values
(--att-prefix --att-prefix-mode patt_kv); a new 1x1x1 Conv3d head trains with them ("Swin-BAPAT").

    # the README recipe on HMDB51 (one GPU, batch 16, 70 epochs, blr 0.1 -> lr 6.25e-3):
    torchrun --nproc_per_node=1 vpetl_video.py --data-set HMDB51 --data-path data/hmdb51 \
        --finetune pre_trained/swin_base_patch244_window877_kinetics400_22k.pth \
        --num-frames 8 --sampling-rate 2 --batch-size 16 --epochs 70 --blr 0.1 \
        --ffn-adapt --att-prefix --att-mid-dim 128 --att-prefix-mode patt_kv --att-prefix-scale 0.8 \
        --work-dir work_dirs/hmdb51_bapat
    # the paper's comparison: drop --att-prefix (adapter only), drop --ffn-adapt (PATT only), drop both
    # (linear probe: only the head trains), --fulltune, --att-prefix-mode prefix (prefix tuning), K600 weights
    # evaluate:   python vpetl_video.py --data-set HMDB51 --data-path ... --eval-only --checkpoint best.pt
    # count:      python vpetl_video.py --data-set SSV2 --ffn-adapt --att-prefix --summary
    # quick start, no files, CPU, under a minute: a tiny Video Swin learns which way a texture moves
    torchrun --nproc_per_node=2 vpetl_video.py --data-set synthetic --model swin_tiny --embed-dim 32 \
        --depths 1 1 1 1 --num-heads 1 2 4 8 --input-size 32 --window-size 8 4 4 --fulltune \
        --opt adamw --lr 1e-3 --epochs 4 --warmup-epochs 1 --batch-size 16 --num-workers 0 \
        --test-num-crop 1 --work-dir work_dirs/synthetic
The official underscore spellings (--num_frames, --data_set, --att_prefix_mode, ...) are accepted too.

Choices where the official code is odd (spec section 6), and what this file does:
- attention is always standard (relative bias, shift mask, softmax). Upstream skips all three unless
  --att_prefix_mode is one of prefix_qk/patt_kv/patt_qv/patt_qkv, whatever --att_prefix is; so
  patt_qk here is done right and the adapter-only / linear / full baselines are not broken;
- --att-prefix-mode prefix is a true prefix-tuning baseline (L learned key/value tokens per block,
  bias and mask padded with 0 for them); upstream's prefix_qk / prefix_kv crash;
- PATT keeps PyTorch's default Linear init (not zero: training starts from a perturbed model, as
  upstream); --patt-zero-init is the ablation. The adapter's Up is zero-initialised ("lora");
- the final multi-view test uses the BEST checkpoint by validation top-1 (upstream tests the last
  epoch: its `model_best = model` is an alias). The validation clip of each video is drawn at random
  once and kept for all epochs (upstream redraws it every epoch), so epochs are compared on equal terms;
- the test takes 3 real spatial crops (left/centre/right along the long side, VideoMAE's intent);
  upstream centre-crops first, so its 3 crops are identical: --test-num-crop 1 reproduces its numbers;
- --tuned-backbone-layer-fc defaults to True (upstream's default 'False' leaves a random frozen head);
- the head pools (2, H, W) of the final map: (2, 7, 7) at 224 as upstream, the actual H, W otherwise;
- videos that cannot be read or are under 1 KB are an error by default (--bad-video error); with
  --bad-video skip they are printed and logged (log.jsonl) by name, never silently resampled;
- decoding is PyAV (upstream: decord), resizing is torch bilinear (antialiased for the training crop, as
  PIL; not for the validation / test short-side resize, as cv2): pixel values differ slightly from upstream;
- --opt adamw exists for the from-scratch CPU quick start only (SGD needs far more steps there); the
  recipe is SGD, momentum 0.9, lr = blr * total batch / 256, warmup then cosine per iteration, AMP on GPU.
"""
import math
import os
from functools import partial

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist as D
from common.io import (ArgumentParser, JsonLog, UserError, check_flags, cli, load_checkpoint, load_state_dict_checked,
                       state_dict_of, work_dir_problem)
from common.train import (RunBook, freeze_all_but, init_lr, param_groups, read_run_checkpoint, set_lr, summary,
                          warmup_cosine)
from common.video_swin import ARCHS, Mlp, SwinBlock3D, SwinTransformer3D, WindowAttention3D, load_pretrained

DATASETS = {"synthetic": 4, "HMDB51": 51, "UCF101": 101, "SSV2": 174, "K400": 400}
ALIASES = {"hmdb": "HMDB51", "ucf": "UCF101", "sthv2": "SSV2", "something-something-v2": "SSV2",
           "kinetics400": "K400", "kinetics-400": "K400", "kinetics": "K400", "swin_transformer": "swin_base"}


# ----------------------------------------------------------------------------------------------------
# arguments (the README's values as defaults)

def get_args(argv=None):
    p = ArgumentParser(description="V-PETL on Video Swin: adapters and PATT for action recognition")
    a = p.add_argument
    # data
    a("--data-set", "--data_set", "--dataset", default="synthetic",
      help="synthetic (no files), HMDB51, UCF101, SSV2 or K400")
    a("--data-path", "--data_path", "--data-root", default=None,
      help="folder with train.csv (training), test.csv (validation per epoch), val.csv (final test)")
    a("--nb-classes", "--nb_classes", type=int, default=None, help="default: the data set's class count")
    a("--num-frames", "--num_frames", type=int, default=8, help="frames per clip")
    a("--sampling-rate", "--sampling_rate", type=int, default=2, help="stride between sampled frames")
    a("--input-size", "--input_size", type=int, default=224, help="training / test crop side")
    a("--short-side-size", "--short_side_size", type=int, default=None,
      help="validation/test resize of the short side (default: --input-size)")
    a("--test-num-segment", "--test_num_segment", type=int, default=4, help="temporal clips per test video")
    a("--test-num-crop", "--test_num_crop", type=int, default=3, help="spatial crops per test clip")
    a("--bad-video", choices=["error", "skip"], default="error",
      help="unreadable or <1 KB videos: stop with an error, or skip them (printed and logged)")
    a("--synthetic-videos", type=int, nargs=3, default=[2048, 256, 256], metavar=("TRAIN", "VAL", "TEST"),
      help="sizes of the synthetic train / validation / test splits (made on the fly)")
    a("--synthetic-frames", type=int, default=20, help="frames per synthetic video")
    # model
    a("--model", default="swin_base", help="swin_tiny, swin_small or swin_base (swin_transformer = base)")
    a("--embed-dim", type=int, default=None, help="override the model's width (e.g. 32 for the quick start)")
    a("--depths", type=int, nargs=4, default=None, help="override blocks per stage")
    a("--num-heads", type=int, nargs=4, default=None, help="override heads per stage")
    a("--window-size", type=int, nargs=3, default=[8, 7, 7], help="(T, H, W) window, as pretrained")
    a("--drop-path", type=float, default=0.4, help="stochastic depth (hard-coded 0.4 upstream)")
    a("--finetune", "--pretrained", default=None,
      help="pretrained Video Swin: the official .pth (backbone.*) or a torchvision swin3d_* state dict")
    # parameter-efficient modules
    a("--ffn-adapt", "--ffn_adapt", action="store_true", help="AdaptFormer adapter beside every MLP")
    a("--ffn-num", "--ffn_num", type=int, default=64, help="adapter bottleneck")
    a("--ffn-scale", type=float, default=0.1, help="adapter output scale (fixed, not learned)")
    a("--att-prefix", "--att_prefix", action="store_true", help="PATT (or prefix tuning) in every attention")
    a("--att-prefix-mode", "--att_prefix_mode", default="patt_kv",
      choices=["patt_kv", "patt_qv", "patt_qk", "patt_qkv", "prefix"])
    a("--att-mid-dim", "--att_mid_dim", type=int, default=128, help="PATT bottleneck m")
    a("--att-prefix-scale", "--att_prefix_scale", type=float, default=0.8, help="PATT scale s (fixed)")
    a("--att-preseqlen", "--att_preseqlen", type=int, default=16,
      help="prefix tokens per block (prefix mode only; inert in patt_* modes, as upstream)")
    a("--patt-zero-init", action="store_true", help="zero-init PATT's Up (ablation; upstream: default init)")
    a("--tuned-backbone-layer-fc", "--tuned_backbone_layer_fc", "--tbl-fc", "--tbl_fc", default="True",
      help="train the classifier head (True/False)")
    a("--fulltune", action="store_true", help="train every parameter")
    # optimisation
    a("--epochs", type=int, default=70)
    a("--warmup-epochs", "--warmup_epochs", type=int, default=10)
    a("--batch-size", "--batch_size", type=int, default=16, help="per process")
    a("--blr", type=float, default=0.1, help="base lr: lr = blr * total batch / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--min-lr", "--min_lr", type=float, default=0.0)
    a("--weight-decay", "--weight_decay", type=float, default=0.0)
    a("--momentum", type=float, default=0.9)
    a("--opt", choices=["sgd", "adamw"], default="sgd",
      help="sgd (momentum, the paper's) or adamw (the CPU quick start from scratch, where SGD is slow)")
    a("--no-amp", action="store_true", help="fp32 on the GPU (AMP is used only where a GPU is)")
    # run
    a("--work-dir", "--output-dir", "--output_dir", default="work_dirs/vpetl")
    a("--resume", action="store_true", help="continue from work-dir/last.pt (same flags; --epochs may grow)")
    a("--skip-data-check", action="store_true", help="do not open every video's header before training")
    a("--eval-only", action="store_true", help="multi-view test of --checkpoint, no training")
    a("--checkpoint", default=None, help="checkpoint for --eval-only (this script's best.pt / last.pt)")
    a("--summary", action="store_true", help="print parameter counts per group and exit")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--num-workers", "--num_workers", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=20)
    a("--dist-eval", "--dist_eval", action="store_true", help="accepted for compatibility: always exact")
    args = p.parse_args(argv)
    names = {k.lower(): k for k in DATASETS}
    key = args.data_set.lower()
    args.data_set = names.get(key) or ALIASES.get(key) or args.data_set
    if args.data_set not in DATASETS:
        p.error(f"--data-set {args.data_set}: expected one of {', '.join(DATASETS)}")
    args.model = ALIASES.get(args.model, args.model)
    if args.model not in ARCHS:
        p.error(f"--model {args.model}: expected one of {', '.join(ARCHS)} (or swin_transformer)")
    if str(args.tuned_backbone_layer_fc).lower() not in ("true", "false", "1", "0"):
        p.error(f"--tuned-backbone-layer-fc {args.tuned_backbone_layer_fc}: expected True or False")
    args.tbl_fc = str(args.tuned_backbone_layer_fc).lower() in ("true", "1")
    args.nb_classes = args.nb_classes or DATASETS[args.data_set]
    args.short_side_size = args.short_side_size or args.input_size
    validate(p, args)
    return args


def validate(p, args):
    """Every flag a user can get wrong, refused with parser.error before any work."""
    check_flags(p, args, positive=("batch_size", "input_size", "epochs", "num_frames", "sampling_rate",
                                   "test_num_segment", "test_num_crop", "nb_classes", "short_side_size", "ffn_num",
                                   "att_mid_dim", "att_preseqlen", "blr", "lr", "embed_dim", "depths", "num_heads",
                                   "window_size", "synthetic_videos", "synthetic_frames", "log_every"),
                non_negative=("warmup_epochs", "min_lr", "weight_decay", "momentum", "num_workers"),
                below_one=("drop_path",))
    if args.short_side_size < args.input_size:
        p.error(f"--short-side-size {args.short_side_size} must be at least --input-size {args.input_size}")
    if args.num_frames < 2:
        p.error(f"--num-frames {args.num_frames}: expected 2 or more")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} is more than --epochs {args.epochs}")
    if args.eval_only and args.resume:
        p.error("--eval-only tests --checkpoint; it does not go with --resume")
    for flag in ("finetune", "checkpoint"):
        path = getattr(args, flag)
        if path and not args.summary and not os.path.isfile(path):
            p.error(f"--{flag} {path}: file not found")
    if not args.summary:
        problem = work_dir_problem(args.work_dir)
        if problem:
            p.error(f"--work-dir {args.work_dir}: {problem}")


# ----------------------------------------------------------------------------------------------------
# the parameter-efficient modules (names as upstream: mlp.adaptmlp.*, attn.qkv_adapter.*, fc.0)

class Adapter(nn.Module):
    """AdaptFormer bottleneck: scale * Up(ReLU(Down(h))), no LayerNorm; "lora" init makes it output 0."""

    def __init__(self, dim, bottleneck=64, scale=0.1):
        super().__init__()
        self.down_proj, self.act, self.up_proj = nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, dim)
        self.scale = scale

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, h):
        return self.up_proj(self.act(self.down_proj(h))) * self.scale


class AdaptMlp(Mlp):
    """The block's MLP with the adapter in parallel on the same input h = LN2(x); the sum goes through
    the block's DropPath and residual: x + DropPath(fc2(GELU(fc1(h))) + 0.1 * Up(ReLU(Down(h))))."""

    def __init__(self, dim, hidden, drop=0.0, bottleneck=64, scale=0.1):
        super().__init__(dim, hidden, drop)
        self.adaptmlp = Adapter(dim, bottleneck, scale)

    def forward(self, h):
        return super().forward(h) + self.adaptmlp(h)


class PattAttention(WindowAttention3D):
    """PATT: delta = Up(tanh(Down(x_w))) from the same windowed tokens as qkv, split like qkv into heads
    and added, times s, to the targets of the mode (kv: keys and values, in that channel order). The
    sequence length does not change; the attention stays standard (bias, mask, softmax)."""

    def __init__(self, dim, window_size, num_heads, mode="patt_kv", mid_dim=128, scale=0.8, zero_init=False, **kw):
        super().__init__(dim, window_size, num_heads, **kw)
        self.targets, self.patt_scale, self.zero_init = mode[len("patt_"):], scale, zero_init
        self.qkv_adapter = nn.Sequential(nn.Linear(dim, mid_dim), nn.Tanh(),
                                         nn.Linear(mid_dim, len(self.targets) * dim))

    def reset_parameters(self):  # PyTorch's default Linear init, as upstream
        self.qkv_adapter[0].reset_parameters()
        self.qkv_adapter[2].reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.qkv_adapter[2].weight)
            nn.init.zeros_(self.qkv_adapter[2].bias)

    def qkv_heads(self, x):
        q, k, v = super().qkv_heads(x)
        b, n, c = x.shape
        delta = self.qkv_adapter(x).view(b, n, len(self.targets), self.num_heads, c // self.num_heads)
        delta = delta.permute(2, 0, 3, 1, 4)  # (B_, N, t, nH, hd) -> (t, B_, nH, N, hd)
        out = {"q": q, "k": k, "v": v}
        for i, t in enumerate(self.targets):
            out[t] = out[t] + self.patt_scale * delta[i]
        return out["q"], out["k"], out["v"]


class PrefixAttention(WindowAttention3D):
    """Prefix tuning (Li & Liang) in every window: L learned key and value tokens per block, shared by all
    windows, prepended to k and v; their logits get no relative bias and no shift mask (zeros)."""

    def __init__(self, dim, window_size, num_heads, length=16, **kw):
        super().__init__(dim, window_size, num_heads, **kw)
        self.prefix_kv = nn.Parameter(torch.zeros(2, length, dim))

    def reset_parameters(self):
        nn.init.trunc_normal_(self.prefix_kv, std=0.02)

    def attend(self, q, k, v, bias, mask=None):
        b, nh, _, hd = q.shape
        length = self.prefix_kv.shape[1]
        pk, pv = self.prefix_kv.view(2, 1, length, nh, hd).transpose(2, 3).expand(-1, b, -1, -1, -1)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B_, nH, N, hd) -> (B_, nH, L + N, hd)
        pad = (length, 0)  # (.., N, N) -> (.., N, L + N): zero bias and no mask on the prefix columns
        return super().attend(q, k, v, F.pad(bias, pad), None if mask is None else F.pad(mask, pad))


class VideoClassifier(nn.Module):
    """Backbone, then upstream's head: avg_pool3d (2, H, W) stride 1 -> Conv3d 1x1x1 -> mean over time,
    i.e. a Linear on the (1, 2, 2, 1)/6-weighted temporal mean of the pooled features for 4 tokens."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Sequential(nn.Conv3d(backbone.num_features, num_classes, kernel_size=1))

    def forward(self, x):
        f = self.backbone(x)  # (B, 3, T, H, W) -> (B, C, T', H', W')
        t, h, w = f.shape[2:]
        f = F.avg_pool3d(f, (min(2, t), h, w), stride=1)  # -> (B, C, T'-1, 1, 1)
        return self.fc(f).flatten(2).mean(-1)  # (B, K, T'-1, 1, 1) -> (B, K)


def is_adapter(n):
    return ".mlp.adaptmlp." in n


def is_patt(n):
    return ".attn.qkv_adapter." in n or n.endswith(".attn.prefix_kv")


def build_model(args):
    attn, mlp = WindowAttention3D, Mlp
    if args.att_prefix and args.att_prefix_mode == "prefix":
        attn = partial(PrefixAttention, length=args.att_preseqlen)
    elif args.att_prefix:
        attn = partial(PattAttention, mode=args.att_prefix_mode, mid_dim=args.att_mid_dim,
                       scale=args.att_prefix_scale, zero_init=args.patt_zero_init)
    if args.ffn_adapt:
        mlp = partial(AdaptMlp, bottleneck=args.ffn_num, scale=args.ffn_scale)
    arch = dict(ARCHS[args.model])
    for k in ("embed_dim", "depths", "num_heads"):
        if getattr(args, k) is not None:
            arch[k] = getattr(args, k)
    backbone = SwinTransformer3D(**arch, window_size=args.window_size, drop_path_rate=args.drop_path,
                                 block=partial(SwinBlock3D, attn_layer=attn, mlp_layer=mlp))
    for m in backbone.modules():  # the backbone's trunc-normal init also hit the new Linears: redo theirs
        if isinstance(m, (Adapter, PattAttention, PrefixAttention)):
            m.reset_parameters()
    return VideoClassifier(backbone, args.nb_classes)


def load_backbone(model, path):
    """Spec 1.6: the pretrained Video Swin (official `backbone.*` or torchvision layout) into the backbone;
    only the adapters / PATT / prefix may be missing (the head is outside the backbone and stays fresh)."""
    petl = [n for n in model.backbone.state_dict() if is_adapter("." + n) or is_patt("." + n)]
    return load_pretrained(model.backbone, path, allow_missing=petl), len(petl)


def set_trainable(model, args):
    """Spec 2.4: only what the pretrained checkpoint lacks trains (adapters, PATT/prefix, the head, the
    latter unless --tuned-backbone-layer-fc False); --fulltune trains all. Modules stay in train mode."""
    return freeze_all_but(model, lambda n: args.fulltune or is_adapter(n) or is_patt(n)
                          or (n.startswith("fc.") and args.tbl_fc))


SUMMARY_GROUPS = {"backbone": lambda n: n.startswith("backbone.") and not (is_adapter(n) or is_patt(n)),
                  "adapters": is_adapter, "patt/prefix": is_patt, "head": lambda n: n.startswith("fc.")}


# ----------------------------------------------------------------------------------------------------
# data: the synthetic motion set, decoding, the three clip samplers (spec 4.3-4.5)

DIRECTIONS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dy, dx) of classes 0..3: left, right, up, down
SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def synthetic_video(seed, label, frames=24, size=40, speed=2):
    """(frames, size, size, 3) uint8: a random texture of 4-px colour cells translating `speed` px per frame
    in the class's direction (a camera pan), wrapping around. Every random draw is made before the label
    is used and the start offset is uniform, so each frame has the same distribution in every class (and
    for a given seed the first frame is the same in all four): the class is only in the motion. A model
    that sees one frame is at chance (25 %); even an order-free bag of frames can only tell horizontal
    from vertical (50 %)."""
    rng = np.random.default_rng(seed)
    cells = -(-size // 4)
    texture = np.kron(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    texture = texture[:size, :size]
    y0, x0 = (int(v) for v in rng.integers(0, size, 2))
    dy, dx = DIRECTIONS[label]
    return np.stack([np.roll(texture, (y0 + dy * speed * t, x0 + dx * speed * t), (0, 1)) for t in range(frames)])


class BadVideo(Exception):
    pass


def decode(path, pick):
    """Frames pick(num_frames) of a video file, a folder of frames (img_00001.jpg, ...) or a synthetic
    video ('synthetic://split/i/label/frames/size') as uint8 (n, H, W, 3). Raises BadVideo."""
    if path.startswith("synthetic://"):
        split, i, label, frames, size = path[len("synthetic://"):].split("/")
        v = synthetic_video(SPLIT_SEED[split] * 10_000_019 + int(i), int(label), int(frames), int(size))
        return v[pick(len(v))]
    if os.path.isdir(path):
        from PIL import Image
        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not files:
            raise BadVideo("folder holds no .jpg/.png frames")
        idx = pick(len(files))
        try:
            loaded = {i: np.asarray(Image.open(os.path.join(path, files[i])).convert("RGB")) for i in set(idx)}
        except OSError as e:
            raise BadVideo(f"unreadable frame: {e}") from None
        return np.stack([loaded[i] for i in idx])
    import av
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except Exception as e:  # PyAV raises FFmpegError subclasses, IndexError when there is no video stream
        why = getattr(e, "strerror", None) or str(e)[:120]  # FFmpeg's message without the path
        raise BadVideo(f"cannot decode ({type(e).__name__}: {why})") from None
    if not frames:
        raise BadVideo("no video frames")
    return np.stack(frames)[pick(len(frames))]


def train_indices(num, n, rate, rng):
    """TSN sampling (1 segment): start uniform in [0, F - n*rate], then every `rate`-th frame; the 1-based
    offset advances only while offset + rate < F, so short videos repeat their last reachable frame."""
    span = n * rate
    off = 1 + (int(rng.integers(0, num - span + 1)) if num >= span else 0)
    idx = []
    for _ in range(n):
        idx.append(off - 1)
        if off + rate < num:
            off += rate
    return np.array(idx)


def val_indices(num, n, rate, rng):
    """VideoMAE validation: a random end e in [n*rate, F), n frames at linspace(e - n*rate, e); short
    videos: linspace(0, F, F // rate) padded with the last frame."""
    span = n * rate
    if num <= span:
        idx = np.concatenate([np.linspace(0, num, num=num // rate), np.full(n - num // rate, num)])
        return np.clip(idx, 0, num - 1).astype(np.int64)
    end = int(rng.integers(span, num))
    return np.clip(np.linspace(end - span, end, num=n), end - span, end - 1).astype(np.int64)


def view_starts(count, n, segments):
    """Start k * max((T' - n) / (segments - 1), 0) in the stride-`rate` frame list, k = 0..segments-1."""
    step = max((count - n) / (segments - 1), 0.0) if segments > 1 else 0.0
    return [int(k * step) for k in range(segments)]


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
SCALES = (1, 0.875, 0.75, 0.66)
FIX_OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))


def to_float(frames):
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, H, W, 3) -> (T, 3, H, W)


def normalize(x):
    return (x.permute(1, 0, 2, 3) / 255.0 - MEAN) / STD  # (T, 3, S, S) -> (3, T, S, S)


def multiscale_box(h, w, size, rng):
    """GroupMultiScaleCrop(size, [1, .875, .75, .66], max_distort 1, fix_crop, more_fix_crop): a side pair
    from the scales of min(H, W) (snapped to `size` within 3 px, scale indices at most 1 apart) and one of
    13 fixed offsets on a (W - w) // 4, (H - h) // 4 grid. Returns (y0, x0, crop h, crop w)."""
    sides = [int(min(h, w) * s) for s in SCALES]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= 1]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    ox, oy = FIX_OFFSETS[int(rng.integers(len(FIX_OFFSETS)))]
    return oy * ((h - ch) // 4), ox * ((w - cw) // 4), ch, cw


def multiscale_crop(x, size, rng):
    """The same box for every frame, then a bilinear (antialiased, as PIL) resize. (T, 3, H, W) -> (T, 3, S, S)."""
    y0, x0, ch, cw = multiscale_box(*x.shape[-2:], size, rng)
    return F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], (size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def resize_short(x, short):
    """Short side to `short`, the long side int(short * long / short_side), bilinear (cv2 style, no antialias)."""
    h, w = x.shape[-2:]
    oh, ow = (int(short * h / w), short) if w < h else (short, int(short * w / h))
    return F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False)


def crop_at(x, size, y0, x0):
    return x[..., y0:y0 + size, x0:x0 + size]


class VideoDataset(torch.utils.data.Dataset):
    """mode 'train' (TSN clip + multi-scale corner crop), 'val' (one centre clip, VideoMAE validation) or
    'test' (segments x crops views, returned stacked). Items: dict(video, label, index, bad); a video that
    cannot be read gives video=None and bad=[(path, reason)], except in training with --bad-video skip,
    where the next video takes its place (and the bad one is still reported)."""

    def __init__(self, samples, mode, args):
        self.samples, self.mode, self.a = samples, mode, args

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, self.a.seed * 1_000_003 + item)
        rng, bad = np.random.default_rng(seed), []
        for attempt in range(10):
            path, label = self.samples[(i + attempt) % len(self.samples)]
            try:
                return {"video": self.load(path, rng), "label": label, "index": i, "bad": bad}
            except BadVideo as e:
                bad.append((path, str(e)))
                if self.mode != "train" or self.a.bad_video == "error":
                    break
        return {"video": None, "label": -1, "index": i, "bad": bad}

    def load(self, path, rng):
        a, n, rate = self.a, self.a.num_frames, self.a.sampling_rate
        if self.mode == "train":
            x = to_float(decode(path, lambda f: train_indices(f, n, rate, rng)))
            return normalize(multiscale_crop(x, a.input_size, rng))  # (3, T, S, S)
        if self.mode == "val":
            x = resize_short(to_float(decode(path, lambda f: val_indices(f, n, rate, rng))), a.short_side_size)
            h, w = x.shape[-2:]
            y0, x0 = int(round((h - a.input_size) / 2)), int(round((w - a.input_size) / 2))
            return normalize(crop_at(x, a.input_size, y0, x0))
        frames = decode(path, lambda f: np.arange(0, f, rate))  # every rate-th frame, padded to n
        frames = np.concatenate([frames, frames[-1:].repeat(max(0, n - len(frames)), 0)])
        x = resize_short(to_float(frames), a.short_side_size)
        h, w = x.shape[-2:]
        along = max(h, w) - a.input_size
        starts = [int(k * along / (a.test_num_crop - 1)) for k in range(a.test_num_crop)] \
            if a.test_num_crop > 1 else [int(round(along / 2))]
        across = (min(h, w) - a.input_size) // 2
        views = []
        for t0 in view_starts(len(frames), n, a.test_num_segment):
            clip = x[t0:t0 + n]
            for s in starts:
                views.append(normalize(crop_at(clip, a.input_size, *((s, across) if h >= w else (across, s)))))
        return torch.stack(views)  # (V, 3, T, S, S), V = segments x crops


def collate(items):
    good = [it for it in items if it["video"] is not None]
    out = {"bad": [b for it in items for b in it["bad"]], "video": None}
    if good:
        out.update(video=torch.stack([it["video"] for it in good]),
                   label=torch.tensor([it["label"] for it in good]), index=torch.tensor([it["index"] for it in good]))
    return out


def read_split(args, name, log, is_main=True):
    """`path,label` lines (no header, comma separated, labels 0-based; paths absolute or relative to
    --data-path). Missing or <1 KB files are bad videos, handled by --bad-video before training starts."""
    if args.data_set == "synthetic":
        if args.nb_classes != 4:
            raise UserError(f"--nb-classes {args.nb_classes}: the synthetic set has 4 classes (left, right, up, down)")
        n = args.synthetic_videos[["train", "val", "test"].index(name)]
        size = (round(args.input_size * 1.25) + 1) // 2 * 2  # even: mp4 needs it, crops have room
        return [(f"synthetic://{name}/{i}/{i % 4}/{args.synthetic_frames}/{size}", i % 4) for i in range(n)]
    if not args.data_path:
        raise UserError(f"--data-set {args.data_set} needs --data-path: a folder with train.csv, test.csv, val.csv")
    path = os.path.join(args.data_path, {"train": "train.csv", "val": "test.csv", "test": "val.csv"}[name])
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --data-path must hold train.csv (training), test.csv (validation "
                        "each epoch) and val.csv (final test), one 'video_path,label' line per video")
    samples, bad = [], []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            try:
                video, label = parts[0].strip(), int(parts[1])
            except (IndexError, ValueError):
                raise UserError(f"{path}:{ln}: expected 'video_path,integer_label', got {line!r}") from None
            if not 0 <= label < args.nb_classes:
                raise UserError(f"{path}:{ln}: label {label} outside 0..{args.nb_classes - 1} "
                                f"({args.data_set} has {args.nb_classes} classes; --nb-classes sets another count)")
            video = video if os.path.isabs(video) else os.path.join(args.data_path, video)
            if not os.path.exists(video):
                bad.append((video, "file not found"))
            elif os.path.isfile(video) and os.path.getsize(video) < 1024:
                bad.append((video, f"only {os.path.getsize(video)} bytes (< 1 KB)"))
            else:
                samples.append((video, label))
    if bad:
        if args.bad_video == "error":
            raise UserError(f"{path}: {len(bad)} bad video(s), e.g. " + "; ".join(f"{p}: {w}" for p, w in bad[:3])
                            + ". Fix the list, or pass --bad-video skip to leave them out (they are logged).")
        handle_bad(bad, args, f"{name} split, left out", show=is_main)
        log_bad(bad, log, f"{name} split, left out")
    if not samples:
        raise UserError(f"{path}: no usable videos")
    return samples


def handle_bad(bad, args, where, show=True):
    """--bad-video error: stop, naming the first bad video; skip: print every name (the caller logs them)."""
    if bad and args.bad_video == "error":
        p, why = bad[0]
        raise UserError(f"bad video {p}: {why}. Expected a readable video (or frame folder) of at least 1 KB; "
                        "--bad-video skip leaves such videos out and logs them in log.jsonl.")
    for p, why in bad if show else []:
        print(f"skipping bad video ({where}) {p}: {why}", flush=True)
    return bad


def log_bad(bad, log, where):
    if bad:
        log(event="skipped_videos", where=where, videos=[p for p, _ in bad], reasons=[w for _, w in bad])


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler(shuffle=True) order (padded to a multiple of the world size), yielding
    (index, sample seed): a clip's augmentation depends on (seed, epoch, rank, position) only, not on
    the worker processes, so a run resumed at an epoch boundary sees exactly the same clips."""

    def __init__(self, n, rank, world, seed):
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.n / self.world)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        perm += perm[:len(self) * self.world - self.n]
        base = ((self.seed * 10_007 + self.epoch) * 1_009 + self.rank) * 1_000_003
        return iter([(i, base + pos) for pos, i in enumerate(perm[self.rank::self.world])])


# ----------------------------------------------------------------------------------------------------
# evaluation: single view per epoch, multi-view at the end; counts summed over ranks, no duplicates

def gather_lists(items):
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return list(items)
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


@torch.no_grad()
def evaluate(model, loader, args, info, log, desc):
    """Top-1 / top-5 (%) and mean loss over the whole split. Test items hold V views: their logits are
    averaged per video before the top-k, as upstream's merge step does."""
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=info.device.type == "cuda" and not args.no_amp)
    stats = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss sum, top-1, top-5, videos
    k = min(5, args.nb_classes)
    bad = []
    for batch in tqdm(loader, desc=desc, disable=not info.is_main, leave=False):
        bad += handle_bad(batch["bad"], args, desc)
        if batch["video"] is None:
            continue
        x, y = batch["video"].to(info.device, non_blocking=True), batch["label"].to(info.device)
        b = x.shape[0]
        views = x.shape[1] if x.dim() == 6 else 1
        with amp:
            logits = model(x.flatten(0, 1) if x.dim() == 6 else x).float()  # (B*V, K)
        logits = logits.view(b, views, -1).mean(1)  # (B*V, K) -> (B, K)
        top = logits.topk(k, dim=1).indices
        stats += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), (top[:, 0] == y).sum().double(),
                              (top == y[:, None]).any(1).sum().double(), stats.new_tensor(b)])
    D.all_reduce_sum(stats)
    bad = gather_lists(bad)
    log_bad(bad, log, desc)
    model.train()
    n = max(stats[3].item(), 1)
    return {"top1": 100 * stats[1].item() / n, "top5": 100 * stats[2].item() / n,
            "loss": stats[0].item() / n, "videos": int(stats[3].item()), "skipped": len(bad)}


def loader_for(dataset, mode, args, info, batch_size):
    if mode == "train":
        sampler = EpochSampler(len(dataset), info.rank, info.world_size, args.seed)
    else:
        sampler = D.ShardSampler(len(dataset), info.rank, info.world_size)
    return D.data_loader(dataset, args.num_workers, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                         drop_last=mode == "train", pin_memory=info.device.type == "cuda")


# ----------------------------------------------------------------------------------------------------
# main: setup, model, data, training loop, validation, final test on the best checkpoint

def run(args):
    if args.summary:  # counts only: built on the meta device, no data, no checkpoint
        with torch.device("meta"):
            model = build_model(args)
        set_trainable(model, args)
        return summary(model, SUMMARY_GROUPS)

    info = D.setup(args.device)
    D.seed_everything(args.seed + info.rank)
    # refuses a work dir holding a run unless --resume, locks it, checks a resume's flags: before any work
    book = None if args.eval_only else RunBook(args, info, metric="top1", unit="epoch", log_prefix="val_")
    log = book.log if book else JsonLog(os.path.join(args.work_dir, "log.jsonl") if info.is_main else None)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = {name: read_split(args, name, log, info.is_main)
              for name in (("test",) if args.eval_only else ("train", "val", "test"))}
    if not args.skip_data_check:
        splits = check_videos(splits, args, info, log)
    model = build_model(args)
    if args.finetune and not (args.eval_only or args.resume):
        layout, new = load_backbone(model, args.finetune)
        if info.is_main:
            print(f"loaded {args.finetune} ({layout}); new modules: {new} tensors; head: a fresh Conv3d")
    if not set_trainable(model, args) and not args.eval_only:
        raise UserError("nothing to train: pass --ffn-adapt, --att-prefix, --fulltune, or keep "
                        "--tuned-backbone-layer-fc True")
    model.to(info.device)
    amp = info.device.type == "cuda" and not args.no_amp

    test_set = VideoDataset(splits["test"], "test", args)
    views = args.test_num_segment * args.test_num_crop
    test_loader = loader_for(test_set, "test", args, info, max(1, args.batch_size // views))
    if args.eval_only:
        if not args.checkpoint:
            raise UserError("--eval-only needs --checkpoint PATH (a best.pt / last.pt of this script, or "
                            "upstream's checkpoint-best.pth)")
        source = f"--checkpoint {args.checkpoint}"
        sd = from_upstream(state_dict_of(load_checkpoint(args.checkpoint, "--checkpoint"), source, ("model", "module")))
        load_state_dict_checked(model, sd, source)
        res = evaluate(model, test_loader, args, info, log, "test")
        if info.is_main:
            print(f"test {args.checkpoint}: top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} "
                  f"({res['videos']} videos x {views} views)")
            log(event="test", checkpoint=args.checkpoint, views=views, **res)
        D.cleanup()
        return res

    train_set = VideoDataset(splits["train"], "train", args)
    val_loader = loader_for(VideoDataset(splits["val"], "val", args), "val", args, info, args.batch_size)
    train_loader = loader_for(train_set, "train", args, info, args.batch_size)
    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training videos over {info.world_size} process(es) do not fill one "
                        f"--batch-size {args.batch_size} batch")
    eff_batch = args.batch_size * info.world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    groups = param_groups(model, args.weight_decay, no_decay_keys=("bn",))  # no "bn" in Swin: one group
    optimizer = (torch.optim.SGD(groups, lr=lr, momentum=args.momentum) if args.opt == "sgd"
                 else torch.optim.AdamW(groups, lr=lr))
    init_lr(optimizer, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    ck = book.resume(model, optimizer)
    if ck and "scaler" in ck:
        scaler.load_state_dict(ck["scaler"])
    if info.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.data_set}: {len(train_set)} train / {len(val_loader.dataset)} val / {len(test_set)} test "
              f"videos, {args.nb_classes} classes; lr {lr:.3g} (batch {eff_batch}); trainable {trainable:,}")
    ddp = model
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    iters = len(train_loader)
    for epoch in range(book.start, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed * 100_003 + epoch * info.world_size + info.rank)  # DropPath: exact on resume
        model.train()
        epoch_bad = []
        for it, batch in enumerate(tqdm(train_loader, desc=f"epoch {epoch}", disable=not info.is_main, leave=False)):
            epoch_bad += handle_bad(batch["bad"], args, f"train epoch {epoch}")
            set_lr(optimizer, warmup_cosine(epoch + it / iters, args.epochs, args.warmup_epochs, args.min_lr / lr))
            x, y = batch["video"].to(info.device, non_blocking=True), batch["label"].to(info.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(ddp(x), y)
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at epoch {epoch} iteration {it}: lower --blr / --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if info.is_main and (it % args.log_every == 0 or it == iters - 1):
                log(epoch=epoch, iter=epoch * iters + it, lr=optimizer.param_groups[0]["lr"], loss=loss.item())
        log_bad(gather_lists(epoch_bad), log, f"train epoch {epoch}")
        # last.pt before the validation (a failing validation loses no epoch), then best.pt by top-1
        book.step_end(epoch + 1, model, optimizer, save=True,
                      evaluate=lambda: evaluate(model, val_loader, args, info, log, f"val epoch {epoch}"),
                      extra={"epoch": epoch, "scaler": scaler.state_dict()})
    D.barrier()

    # final multi-view test on the best validation checkpoint (upstream tests the last epoch)
    best_path = os.path.join(args.work_dir, "best.pt")
    load_state_dict_checked(model, read_run_checkpoint(best_path, "best.pt")["model"], best_path)
    res = evaluate(model, test_loader, args, info, log, "test")
    best_epoch = book.best_at - 1 if book.best_at else -1
    if info.is_main:
        print(f"test (best.pt, epoch {best_epoch}): top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} "
              f"({res['videos']} videos x {views} views)")
        log(event="test", checkpoint="best.pt", best_epoch=best_epoch, views=views, **res)
    book.release()
    D.cleanup()
    return res


def from_upstream(sd):
    """Upstream's checkpoint-best.pth holds the Swin itself ('model': patch_embed.*, layers.*, norm.*, fc.0.*,
    no 'backbone.' prefix): the keys of our VideoClassifier are those with 'backbone.' before all but fc."""
    if any(k.startswith("backbone.") for k in sd):
        return sd
    return {(k if k.startswith("fc.") else "backbone." + k): v for k, v in sd.items()}


def video_header(path):
    """None if the video opens (a file's container and a video stream, a frame folder's first frame),
    else why not. Headers only: decoding happens when the clip is drawn."""
    if path.startswith("synthetic://"):
        return None
    if os.path.isdir(path):
        from PIL import Image
        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not files:
            return "folder holds no .jpg/.png frames"
        try:
            with Image.open(os.path.join(path, files[0])) as im:
                im.size
        except Exception as e:
            return f"unreadable frame {files[0]} ({type(e).__name__})"
        return None
    import av
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
    except Exception as e:  # FFmpegError subclasses
        return f"cannot open ({type(e).__name__}: {getattr(e, 'strerror', None) or str(e)[:120]})"
    return None


def check_videos(splits, args, info, log):
    """Before training: every video of every split opens (headers, over the processes and threads). Bad
    ones stop the run (--bad-video error) or are left out, printed and logged (--bad-video skip)."""
    paths = sorted({p for samples in splits.values() for p, _ in samples})
    bad = dict(D.check_in_parallel(paths, video_header, info))
    if not bad:
        return splits
    if args.bad_video == "error":
        p = next(iter(bad))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"bad video {p}: {bad[p]}{more}; found by the data check before training. Expected a "
                        "readable video (or frame folder); --bad-video skip leaves such videos out and logs them, "
                        "--skip-data-check skips the check", all_ranks=True)
    out = {}
    for name, samples in splits.items():
        left = [(p, bad[p]) for p, _ in samples if p in bad]
        handle_bad(left, args, f"{name} split, left out", show=info.is_main)
        log_bad(left, log, f"{name} split, left out")
        out[name] = [(p, label) for p, label in samples if p not in bad]
        if not out[name]:
            raise UserError(f"the {name} split has no readable video left", all_ranks=True)
    return out


def main(argv=None):
    return run(get_args(argv))


if __name__ == "__main__":
    cli(main)
