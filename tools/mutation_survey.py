"""Mutation survey: realistic one-line bugs, put into a scratch copy of the tree one at a time, each followed
by the test files that should catch it. A mutation the tests do not catch ("survives") marks a hole in the
suite: a wrong recipe value or a mis-wired module that would silently change a user's numbers.

    python tools/mutation_survey.py --check                        # every mutation applies and still imports
    python tools/mutation_survey.py --suite recipe -o recipe.json  # judged by tests/test_recipe_*.py (~20 min)
    python tools/mutation_survey.py --suite existing -o existing.json   # by the other test files (~2 h)
    python tools/mutation_survey.py --suite recipe --only 1 7 S2   # some of them
    python tools/mutation_survey.py --table existing.json recipe.json   # the README's figures, per file

The working tree is never modified: its tracked and untracked (not ignored) files are copied to a temporary
folder, each mutation is applied there (an exact string replacement that must match once), pytest runs
the mutation's test files with -x, and the file is restored. ``--suite existing`` runs, per mutated file,
the test files that exercise it (EXISTING below) without their end-to-end runs (END_TO_END: training,
torchrun; minutes per mutation); ``--e2e`` adds those for the mutations the unit tests miss.
``--suite recipe`` runs the recipe tests (RECIPE / ALL_RECIPE). Ids 1-18 are the changes listed in
issue 12, S1-S55 our own survey, B1-B8 a blind round written after the recipe tests, A1-A10 / U1-U3 the
source-free scripts'.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    id: str
    file: str
    old: str
    new: str
    what: str


M = Mutation
MUTATIONS = [
    # ---- issue 12's eighteen
    M("1", "common/swin.py", "return x * mask / keep", "return x * mask", "DropPath survivors not rescaled by 1/keep"),
    M("2", "common/seg_transforms.py", "MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255\nSTD = (58.395, 57.12, 57.375)",
      "MEAN = (103.53, 116.28, 123.675)  # RGB, 0..255\nSTD = (57.375, 57.12, 58.395)", "mean / std in BGR order"),
    M("3", "common/seg_transforms.py", "ratio_range=(0.5, 2.0), cat_max_ratio=0.75,",
      "ratio_range=(0.5, 1.5), cat_max_ratio=0.75,", "random-resize ratio range 0.5-1.5"),
    M("4", "propetl.py", "return self.final_proj_cls(self.final_proj(tokens.mean(dim=1)))",
      "return self.final_proj_cls(self.final_proj(self.backbone.norm3(tokens).mean(dim=1)))",
      "midstream head reads the LayerNorm'd stage-4 map"),
    M("5", "propetl.py", "a = self.adaptmlp(x)\n        x = x + self.drop_path(self.mlp(self.norm2(x)))\n        return x + a",
      "a = self.drop_path(self.adaptmlp(x))\n        x = x + self.drop_path(self.mlp(self.norm2(x)))\n        return x + a",
      "MidBlock: the adapter's output through DropPath"),
    M("6", "propetl.py", 'swin = convert_swin_state_dict({k: v for k, v in bb.items() if not k.startswith("final_proj")})',
      'swin = {k: v for k, v in bb.items() if not k.startswith("final_proj")}',
      "--mid-checkpoint: the official mmseg Swin names (stages.) not converted"),
    M("7", "common/deform_adapter.py", "self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))",
      "self.gamma = nn.Parameter(torch.ones(dim))", "injector gamma created as ones"),
    M("8", "vit_adapter_seg.py", "c4 = c4 + F.interpolate(x4, scale_factor=0.5",
      "c4 = c4 + F.interpolate(x3, scale_factor=0.5", "stride-32 output adds the third interaction's features"),
    M("9", "common/vit.py", 'size=model.pretrain_grid, mode="bicubic"', 'size=model.pretrain_grid, mode="bilinear"',
      "checkpoint pos-embed resize bilinear"),
    M("10", "vpetl_video.py", "logits = logits.view(b, views, -1).mean(1)", "logits = logits.view(b, views, -1)[:, 0]",
      "multi-view test: the first view instead of the mean"),
    M("11", "vpetl_video.py", "eff_batch = args.batch_size * info.world_size", "eff_batch = args.batch_size",
      "lr from the per-process batch"),
    M("12", "common/segment.py", 'reduction="none").mean()', ")", "seg loss averaged over non-ignored pixels"),
    M("13", "common/segment.py", 'losses["loss_aux"] = self.aux_weight * seg_loss(', 'losses["loss_aux"] = seg_loss(',
      "auxiliary loss weight dropped"),
    M("14", "common/upernet.py", "laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])",
      "laterals[i - 1] = laterals[i - 1]", "UPerHead: no top-down additions"),
    M("15", "common/train.py", "wd = 0.0 if any(k in name for k in no_decay_keys) else weight_decay",
      "wd = weight_decay", "param_groups: weight decay on norms and position tables"),
    M("16", "common/segment.py", "label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=255)",
      "label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=0)", "pad_batch pads labels with class 0"),
    M("17", "common/segment.py", "hg = max(h - hc + hs - 1, 0) // hs + 1\n    wg = max(w - wc + ws - 1, 0) // ws + 1",
      "hg = max(h - hc, 0) // hs + 1\n    wg = max(w - wc, 0) // ws + 1", "slide_inference grid rounds down"),
    M("18", "common/dist.py", "for i in perm[self.rank::self.world] if", "for i in perm[0::self.world] if",
      "training sampler: every rank draws shard 0"),
    # ---- our survey: backbones
    M("S1", "common/swin.py", "dpr = [drop_path_rate * j / max(1, n - 1)", "dpr = [drop_path_rate * j / max(1, n)",
      "Swin drop-path rates stop short of the maximum"),
    M("S2", "common/swin.py", ".bernoulli_(keep)", ".bernoulli_(self.p)", "DropPath keeps with probability p"),
    M("S3", "common/swin.py", "self.scale = (dim // num_heads) ** -0.5", "self.scale = dim ** -0.5",
      "attention scale over the full width"),
    M("S4", "common/swin.py", 't = F.interpolate(t, size=(s_new, s_new), mode="bicubic"',
      't = F.interpolate(t, size=(s_new, s_new), mode="bilinear"', "rel-pos table resize bilinear"),
    M("S5", "common/swin.py", "_UNFOLD_TO_OFFICIAL = [0, 2, 1, 3]", "_UNFOLD_TO_OFFICIAL = [0, 1, 2, 3]",
      "mmseg patch-merging channel order not undone"),
    M("S6", "common/vit.py", "return [rate * i / (depth - 1) if depth > 1", "return [rate * i / depth if depth > 1",
      "ViT drop-path rates stop short of the maximum"),
    M("S7", "common/vit.py", "return nn.LayerNorm(dim, eps=1e-6)", "return nn.LayerNorm(dim)", "ViT LayerNorm eps 1e-5"),
    M("S8", "common/vit.py", 'self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()\n'
      "        if layer_scale:", 'self.drop_path = StochasticDepth(drop_path, "batch") if drop_path > 0 else '
      "nn.Identity()\n        if layer_scale:", "ViT DropPath drops the whole batch"),
    # data
    M("S9", "common/seg_transforms.py", "ratio_range=(0.5, 2.0), cat_max_ratio=0.75,", "ratio_range=(0.5, 2.0), cat_max_ratio=1.0,",
      "crop category check off by default"),
    M("S10", "common/seg_transforms.py", "counts.max() / counts.sum() < self.cat_max_ratio",
      "counts.max() / counts.sum() <= self.cat_max_ratio", "crop check accepts a share of exactly 0.75"),
    M("S11", "common/seg_transforms.py", "saturation_range=(0.5, 1.5), hue_delta=18)", "saturation_range=(0.5, 1.5), hue_delta=36)",
      "hue delta in degrees instead of OpenCV units"),
    M("S12", "common/seg_data.py", "24: 11, 25: 12, 26: 13, 27: 14, 28: 15", "24: 11, 25: 12, 26: 14, 27: 13, 28: 15",
      "Cityscapes car / truck train ids swapped"),
    M("S13", "common/seg_transforms.py", "return int(h * f + 0.5), int(w * f + 0.5)", "return int(h * f), int(w * f)",
      "rescale sizes truncated instead of rounded"),
    M("S14", "common/seg_transforms.py", "out_label = torch.full((ch, cw), IGNORE, dtype=torch.long)",
      "out_label = torch.zeros((ch, cw), dtype=torch.long)", "train transform pads labels with class 0"),
    M("S15", "common/seg_transforms.py", "img = resize_bilinear(img, tuple(math.ceil(s / d) * d for s in img.shape[:2]))",
      "img = resize_bilinear(img, tuple(round(s / d) * d for s in img.shape[:2]))", "ResizeToMultiple rounds to nearest"),
    # heads, losses, inference
    M("S16", "common/segment.py", 'return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)',
      'return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)',
      "logits resized with align_corners=True"),
    M("S17", "common/segment.py", "return resize(logits, ori_size).softmax(dim=1)",
      "return resize(logits.softmax(dim=1), ori_size)", "softmax before the resize to the original size"),
    M("S18", "common/segment.py", "y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)", "y1, x1 = y1, x1",
      "slide windows not clamped back to a full crop at the border"),
    M("S19", "common/upernet.py", "return self.bottleneck(torch.cat([x] + pooled, dim=1))",
      "return self.bottleneck(torch.cat(pooled + [x], dim=1))", "PPM concatenation order"),
    M("S20", "common/upernet.py", "for i in range(len(laterals) - 1, 0, -1):", "for i in range(1, len(laterals)):",
      "UPerHead top-down pass in the wrong order (no accumulation)"),
    M("S21", "common/upernet.py", 'nn.init.kaiming_normal_(self.conv.weight, mode="fan_out"',
      'nn.init.kaiming_normal_(self.conv.weight, mode="fan_in"', "ConvModule kaiming fan_in"),
    # training helpers
    M("S22", "common/train.py", "return min_ratio + (1 - min_ratio) * 0.5 *", "return min_ratio + 0.5 *",
      "cosine schedule overshoots a non-zero min lr"),
    M("S23", "common/train.py", 'g["initial_lr"] = base_lr * g.get("lr_scale", 1.0)', 'g["initial_lr"] = base_lr',
      "per-group lr scale ignored"),
    M("S24", "common/dist.py", "manual_seed(self.seed * 100_003 + epoch)", "manual_seed(self.seed * 100_003)",
      "training sampler: the same order every epoch"),
    M("S25", "common/dist.py", "torch.manual_seed((seed * 1_000_003 + it) * 64 + rank)",
      "torch.manual_seed(seed * 1_000_003 + it)", "per-iteration seed ignores the rank"),
    M("S26", "common/dist.py", "yield i, (self.seed * 1_000_003 + self.rank) * 10_000_019 + pos",
      "yield i, self.seed * 10_000_019 + pos", "augmentation seeds equal on every rank"),
    # propetl.py
    M("S27", "propetl.py", "down=dict(iters=40_000, warmup=500, lr=1e-4,", "down=dict(iters=40_000, warmup=500, lr=6e-5,",
      "VOC downstream lr"),
    M("S28", "propetl.py", "weight_decay=0.02, scale=(2048, 512), crop=512,",
      "weight_decay=0.02, scale=(2048, 512), crop=640,", "ADE20K downstream crop 640 (config: 512 padded)"),
    M("S29", "propetl.py", "mid=dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2560, 640)",
      "mid=dict(iters=80_000, warmup=500, lr=6e-5, weight_decay=0.01, scale=(2048, 512)", "ADE20K midstream scale"),
    M("S30", "propetl.py", "stage = {**stage, **FULL_FT}", "stage = {**FULL_FT, **stage}",
      "full fine-tuning recipe overridden by the preset"),
    M("S31", "propetl.py", 'a("--drop-path", type=float, default=0.3,', 'a("--drop-path", type=float, default=0.2,',
      "Swin drop path 0.2"),
    M("S32", "propetl.py", "args.head_channels // 2, num_classes), aux_weight=0.4)",
      "args.head_channels // 2, num_classes), aux_weight=1.0)", "aux weight 1.0"),
    M("S33", "propetl.py", 'NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm")',
      'NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table")', "norms decayed (full fine-tuning)"),
    M("S34", "propetl.py", "return counts / flat.shape[1]", "return counts / valid.sum(1, keepdim=True).clamp(min=1)",
      "histogram target renormalised over labelled pixels"),
    # vit_adapter_seg.py
    M("S35", "vit_adapter_seg.py", '"ade20k_deit_small": Preset(size="small", **_DEIT, lr=6e-5,',
      '"ade20k_deit_small": Preset(size="small", **_DEIT, lr=1.2e-4,', "DeiT-S lr"),
    M("S36", "vit_adapter_seg.py", "layer_decay=0.90, drop_path=0.3,", "layer_decay=0.95, drop_path=0.3,",
      "BEiT-L layer decay 0.95"),
    M("S37", "vit_adapter_seg.py", '"small": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.2,',
      '"small": dict(deform_heads=6, deform_ratio=1.0, drop_path=0.1,', "ViT-Adapter-S drop path"),
    M("S38", "vit_adapter_seg.py", "test_scale=(4096, 520)", "test_scale=(2048, 520)", "Pascal Context test scale"),
    M("S39", "vit_adapter_seg.py", "FCNHead(d, 256, num_classes, in_index=2)", "FCNHead(d, 256, num_classes, in_index=3)",
      "aux head on the stride-32 map"),
    M("S40", "vit_adapter_seg.py", "self.drop_path_rate, use_extra_extractor and i == n - 1, with_cp)",
      "0.0, use_extra_extractor and i == n - 1, with_cp)", "extractors without DropPath"),
    M("S41", "vit_adapter_seg.py", "size_divisor=None if args.ms_flip else 32,", "size_divisor=None,",
      "single-scale test without ResizeToMultiple(32)"),
    M("S42", "vit_adapter_seg.py", "train_tf = TrainTransform(scale=args.scale, crop=(args.crop, args.crop), mean=mean, std=std)",
      "train_tf = TrainTransform(scale=args.scale, crop=(args.crop, args.crop))", "AugReg 127.5 normalisation lost in training"),
    M("S43", "common/deform_adapter.py", "ref, self.feat_norm(x), shapes, starts)", "ref, x, shapes, starts)",
      "extractor without its feature LayerNorm"),
    M("S44", "vit_adapter_seg.py", "c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)",
      "c = torch.cat([c2, c3, c4], dim=1)", "level embeddings not added"),
    M("S45", "vit_adapter_seg.py", "return int(name.split(\".\")[2]) + 1", "return int(name.split(\".\")[2])",
      "layer decay: block i at layer i"),
    # vpetl_video.py
    M("S46", "vpetl_video.py", "MEAN = torch.tensor([0.485, 0.456, 0.406])", "MEAN = torch.tensor([0.406, 0.456, 0.485])",
      "video mean in BGR order"),
    M("S47", "vpetl_video.py", 'a("--drop-path", type=float, default=0.4,', 'a("--drop-path", type=float, default=0.1,',
      "Video Swin drop path 0.1"),
    M("S48", "vpetl_video.py", 'a("--att-prefix-scale", "--att_prefix_scale", type=float, default=0.8,',
      'a("--att-prefix-scale", "--att_prefix_scale", type=float, default=0.2,', "PATT scale 0.2 (upstream default)"),
    M("S49", "vpetl_video.py", "manual_seed(self.seed + self.epoch)", "manual_seed(self.seed)",
      "epoch sampler: the same order every epoch"),
    M("S50", "vpetl_video.py", "enumerate(perm[self.rank::self.world])", "enumerate(perm[0::self.world])",
      "epoch sampler: every rank takes shard 0"),
    M("S51", "vpetl_video.py", 'F.cross_entropy(logits, y, reduction="sum").double()', "F.cross_entropy(logits, y).double()",
      "evaluation loss: batch means summed"),
    M("S52", "vpetl_video.py", "y0, x0 = int(round((h - a.input_size) / 2)), int(round((w - a.input_size) / 2))",
      "y0, x0 = 0, 0", "validation crop at the corner"),
    M("S53", "vpetl_video.py", "f = F.avg_pool3d(f, (min(2, t), h, w), stride=1)", "f = F.avg_pool3d(f, (t, h, w), stride=1)",
      "head pools all of time (not upstream's (2, H, W))"),
    # the schedules the training loops set
    M("S54", "propetl.py", "set_lr(opt, warmup_poly(it, args.iters, args.warmup))",
      "set_lr(opt, warmup_poly(it + 1, args.iters, args.warmup))", "ProPETL loop sets the next iteration's lr"),
    M("S55", "vit_adapter_seg.py", "set_lr(opt, warmup_poly_mmcv(it, args.iters, args.warmup))",
      "set_lr(opt, warmup_poly_mmcv(it, args.iters, args.warmup, power=0.9))", "ViT-Adapter poly power 0.9"),
    # a blind round, written after the recipe tests: how many neighbours do they catch untargeted?
    M("B1", "common/segment.py", "return resize(self.decode_head(self.backbone(img)), img.shape[2:])",
      "return self.decode_head(self.backbone(img))", "inference logits left at stride 4"),
    M("B2", "common/upernet.py", "self.dropout = nn.Dropout2d(dropout_ratio)", "self.dropout = nn.Dropout(dropout_ratio)",
      "heads drop pixels instead of channels"),
    M("B3", "propetl.py", "args.crop, args.pad = _pair(args.crop or stage[\"crop\"]), _pair(stage[\"pad\"])",
      "args.crop, args.pad = _pair(args.crop or stage[\"crop\"]), _pair(stage[\"crop\"])", "batch padded to the crop"),
    M("B4", "propetl.py", "opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999),",
      "opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99),", "ProPETL AdamW beta2 0.99"),
    M("B5", "vit_adapter_seg.py", "opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999),",
      "opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99),", "ViT-Adapter AdamW beta2 0.99"),
    M("B6", "common/deform_adapter.py", "ref, self.feat_norm(c), shapes, starts)", "ref, self.query_norm(c), shapes, starts)",
      "injector normalises the prior with the query's norm"),
    M("B7", "vpetl_video.py", "set_lr(optimizer, warmup_cosine(epoch + it / iters,", "set_lr(optimizer, warmup_cosine(epoch,",
      "V-PETL schedule stepped per epoch"),
    M("B8", "vpetl_video.py", "return super().forward(h) + self.adaptmlp(h)", "return super().forward(h) + 0.1 * self.adaptmlp(h)",
      "adapter scaled twice"),
    # ---- A1-A10, U1-U3: the source-free scripts (written with their recipe tests)
    M("A1", "atp_sfda.py", "def ema_update(teacher, student, it, alpha=0.999):",
      "def ema_update(teacher, student, it, alpha=0.99):", "EMA teacher alpha 0.99"),
    M("A2", "atp_sfda.py", "if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):",
      "if isinstance(m, nn.modules.dropout._DropoutNd):", "the teacher's DropPath left on"),
    M("A3", "atp_sfda.py", "def negative_loss(logits, tau=0.04):", "def negative_loss(logits, tau=0.05):",
      "negative-learning threshold 0.05"),
    M("A4", "atp_sfda.py", 'CUSTOM_KEYS = {"head": dict(lr_mult=10.0),', 'CUSTOM_KEYS = {"head": dict(lr_mult=1.0),',
      "heads without lr x10"),
    M("A5", "atp_sfda.py", "threshold=0.968, **_):", "threshold=0.9, **_):", "step P's confidence threshold 0.9"),
    M("A6", "atp_sfda.py", 'default=0.3, help="rank: fraction', 'default=0.67, help="rank: fraction',
      "IntraDA's easy ratio 0.67"),
    M("A7", "atp_sfda.py", "    if it >= start_contrast:", "    if it > start_contrast:",
      "the contrastive loss one iteration late"),
    M("A8", "atp_sfda.py", "key=lambda t: (t[1], t[0]))", "key=lambda t: (-t[1], t[0]))",
      "ranking: hardest first"),
    M("A9", "atp_sfda.py", "y_m = torch.where(m[:, 0] > 0, y_e, y_h)", "y_m = torch.where(m[:, 0] > 0, y_h, y_e)",
      "ClassMix labels swapped"),
    M("A10", "atp_sfda.py", "        w_h[:, :ignore_top] = 0", "        w_h[:ignore_top] = 0",
      "step P's top rows zeroed over the batch axis"),
    M("U1", "uni_uvpt.py", '"interactions": dict(lr_mult=5.0)}', '"interactions": dict(lr_mult=1.0)}',
      "prompt interactors without lr x5"),
    M("U2", "uni_uvpt.py", "init_values=1e-6, conv_inplane=64):", "init_values=1.0, conv_inplane=64):",
      "injector gamma starts at 1"),
    M("U3", "uni_uvpt.py", "                rows = D.gather_tensors(rows, dev)\n", "",
      "the correction hook sees only its own process's images"),
]

# per mutated file, the existing test files that exercise it, fast files first
EXISTING = {
    "common/swin.py": ["test_swin.py", "test_propetl.py"],
    "common/seg_data.py": ["test_seg_data.py", "test_vit_adapter.py", "test_propetl.py"],
    "common/seg_transforms.py": ["test_seg_data.py", "test_vit_adapter.py", "test_propetl.py"],
    "common/vit.py": ["test_vit.py", "test_vit_adapter.py"],
    "common/deform_adapter.py": ["test_vit_adapter.py", "test_uni_uvpt.py"],
    "common/segment.py": ["test_metrics.py", "test_vit_adapter.py", "test_propetl.py"],
    "common/upernet.py": ["test_vit_adapter.py", "test_propetl.py"],
    "common/train.py": ["test_foundation.py", "test_vpetl.py", "test_vit_adapter.py", "test_propetl.py"],
    "common/dist.py": ["test_foundation.py", "test_metrics.py", "test_vpetl.py", "test_vit_adapter.py", "test_propetl.py"],
    "propetl.py": ["test_propetl.py"],
    "vit_adapter_seg.py": ["test_vit_adapter.py"],
    "vpetl_video.py": ["test_vpetl.py"],
    "atp_sfda.py": ["test_atp.py"],
    "uni_uvpt.py": ["test_uni_uvpt.py"],
}
# the end-to-end runs (training, torchrun): phase 2 of --suite existing
END_TO_END = ["test_a_short_run_learns", "test_quick_start_under_torchrun", "test_user_errors_are_one_clear_line",
              "test_bad_dataset_files_are_named", "test_failed_runs_never_clobber", "test_both_stages_train_only",
              "test_resume_is_exact", "test_short_run_loss_falls", "test_torchrun_two_processes", "test_image_demo",
              "test_pretrained_vit_into_the_adapter", "test_learns_motion_under_torchrun",
              "test_csv_pipeline_bad_videos", "test_two_processes_give_exactly", "test_synthetic_is_learnable",
              "test_steps_under_torchrun_match_one_process", "test_adapted_model_beats_the_source_model_on_the_target",
              "test_two_processes_write_the_pseudo_labels_of_one"]
RECIPE = {
    "propetl.py": ["test_recipe_propetl.py"],
    "vit_adapter_seg.py": ["test_recipe_vit_adapter.py"],
    "common/deform_adapter.py": ["test_recipe_vit_adapter.py"],
    "vpetl_video.py": ["test_recipe_vpetl.py"],
}
ALL_RECIPE = ["test_recipe_common.py", "test_recipe_propetl.py", "test_recipe_vit_adapter.py", "test_recipe_vpetl.py"]


def scratch_copy():
    """The working tree's tracked and untracked (not ignored) files in a temporary folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    dst = tempfile.mkdtemp(prefix="mutation_survey_")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, f))
    return dst


def run_pytest(tree, files, select=None, timeout=1800):
    """(True if the tests pass, i.e. the mutation survives; the first failure). A timeout counts as caught."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:randomly",
           *[os.path.join("tests", f) for f in files]]
    if select:
        cmd += ["-k", select]
    # the compiled op's cache of its own: a cache shared with another checkout is rebuilt at every switch
    env = dict(os.environ, MSDA_BUILD_DIR=os.environ.get("MSDA_BUILD_DIR", os.path.join(tree, ".msda_build")))
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    if r.returncode == 5:  # nothing selected: nothing failed
        return True, ""
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return r.returncode == 0, (lines or r.stdout.strip().splitlines()[-1:] or [""])[0][:200]


def files_for(m, suite, tree):
    files = EXISTING[m.file] if suite == "existing" else RECIPE.get(m.file, ALL_RECIPE)
    missing = [f for f in files if not os.path.isfile(os.path.join(tree, "tests", f))]
    if missing:  # pytest would fail on them, and the mutation would count as caught
        raise SystemExit(f"mutation {m.id}: test file(s) {missing} not found")
    return files


def run_one(tree, m, suite, files=None, with_e2e=False):
    path = os.path.join(tree, m.file)
    with open(path) as f:
        original = f.read()
    if original.count(m.old) != 1:
        raise SystemExit(f"mutation {m.id}: the text to replace occurs {original.count(m.old)} times in {m.file}")
    with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
    try:
        files = files or files_for(m, suite, tree)
        if suite == "existing":  # unit tests first; the end-to-end runs only if asked and they all pass
            e2e = " or ".join(END_TO_END)
            survived, why = run_pytest(tree, files, f"not ({e2e})")
            if survived and with_e2e:
                survived, why = run_pytest(tree, files, e2e)
        else:
            survived, why = run_pytest(tree, files)
    finally:
        with open(path, "w") as f:
            f.write(original)
    return survived, why


def check(tree):
    """Every mutation applies exactly once and leaves a module that still imports."""
    for m in MUTATIONS:
        path = os.path.join(tree, m.file)
        with open(path) as f:
            original = f.read()
        n = original.count(m.old)
        ok = n == 1
        if ok:
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            mod = m.file[:-3].replace("/", ".")
            r = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=tree, capture_output=True, text=True)
            ok = r.returncode == 0
            with open(path, "w") as f:
                f.write(original)
        print(f"{m.id:>4} {m.file:<20} {'ok' if ok else 'BROKEN (occurs %d times or fails to import)' % n}")


def table(paths):
    """Per mutated file and in total: mutations tried, caught by the existing tests, caught once the recipe
    tests are added (a Markdown table, as in the README)."""
    seen = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                seen.setdefault(r["id"], {})[r["suite"]] = not r["survived"]
    rows = OrderedDict((f, [0, 0, 0]) for f in EXISTING)
    totals = OrderedDict((k, [0, 0, 0]) for k in ("issue 12's changes", "our survey", "blind round", "all"))
    for m in MUTATIONS:
        caught = seen.get(m.id, {})
        if "existing" not in caught or "recipe" not in caught:
            continue
        before = caught["existing"]
        after = before or caught["recipe"]
        kind = "issue 12's changes" if m.id.isdigit() else "blind round" if m.id.startswith("B") else "our survey"
        for row in (rows[m.file], totals[kind], totals["all"]):
            row[0], row[1], row[2] = row[0] + 1, row[1] + before, row[2] + after
    print("| mutated file | tried | caught before | caught after |")
    print("| --- | ---: | ---: | ---: |")
    for name, (n, before, after) in list(rows.items()) + list(totals.items()):
        if n:
            label = f"`{name}`" if name in rows else f"**{name}**"
            print(f"| {label} | {n} | {before} | {after} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=["existing", "recipe"], help="which test files judge the mutations")
    p.add_argument("--only", nargs="+", help="mutation ids")
    p.add_argument("--check", action="store_true", help="only check that every mutation applies and imports")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the survey table from result files")
    p.add_argument("--e2e", action="store_true",
                   help="--suite existing: also run the end-to-end tests (training, torchrun) on the survivors")
    p.add_argument("--files", nargs="+", help="run these test files (tests/...) instead of the suite's")
    p.add_argument("-o", "--out", help="write the results as JSON (rewritten after every mutation)")
    args = p.parse_args()
    if args.table:
        return table(args.table)
    tree = scratch_copy()
    try:
        if args.check:
            return check(tree)
        if not args.suite:
            p.error("--suite is required (or --check / --table)")
        chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
        results = []
        for m in chosen:
            t0 = time.time()
            survived, why = run_one(tree, m, args.suite, args.files, args.e2e)
            results.append(dict(id=m.id, file=m.file, what=m.what, suite=args.suite, e2e=args.e2e,
                                survived=survived, why=why, seconds=round(time.time() - t0, 1)))
            print(f"{m.id:>4} {m.file:<20} {'SURVIVED' if survived else 'caught  '} {time.time() - t0:6.1f}s  "
                  f"{m.what}  {why}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
        print(f"{sum(not r['survived'] for r in results)} of {len(results)} caught by the {args.suite} tests")
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
