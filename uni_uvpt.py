"""Uni-UVPT (NeurIPS 2023): visual prompt tuning for source-free domain adaptive semantic segmentation.

Ma, Wang, Liu, Guo, Wang, "When Visual Prompt Tuning Meets Source-Free Domain Adaptive Semantic
Segmentation". Official code: github.com/huawei-noah/noah-research, folder uni-uvpt/ (mmseg 0.30):
`mmseg_custom/models/backbones/{adapter_modules,swin_prompt,mix_transformer_prompt}.py`,
`models/segmentors/encoder_decoder_prompt.py`, `models/losses/{JSD_loss,GtA_losses}.py`,
`core/hook/online_pseudo_update_hook.py`, `configs/**`, `launcher_*.py`. Spec: shared/papers/uni_uvpt.md,
corrected by shared/papers/audit_atp_uni_uvpt.md (section B).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import UserError
from common.swin import DropPath, SwinTransformer
from ops import MSDeformAttn

IGNORE = 255


# ----------------------------------------------------------------------------------------------------
# Model: the prompt adapter (spec 2.3). SPM = "prompt generator", interactions = "prompt interactors".
# Injector, Extractor and ConvFFN are ViT-Adapter's modules unchanged (same names, same keys).

def _conv_bn_relu(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """ViT-Adapter's stem with a stride-1 max-pool: prompts at strides 2 / 4 / 8 of the image (c1..c3),
    each projected to the stage-0 width by a 1x1 conv with bias. conv4 (stride 16) is computed and its
    output discarded, as in the official code (0.59M parameters that never get a gradient)."""

    def __init__(self, inplanes=64, embed_dim=128):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 1, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, img):
        c1 = self.stem(img)                       # (B, 64, H/2, W/2)
        c2 = self.conv2(c1)                       # (B, 128, H/4, W/4)
        c3 = self.conv3(c2)                       # (B, 256, H/8, W/8)
        self.conv4(c3)                            # official quirk: computed (BN statistics move), unused
        # (B, D, h, w) -> (B, h*w, D)
        return [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc1, c1), (self.fc2, c2), (self.fc3, c3))]


def reference_points(shapes, device):
    """Pixel centres ((x + 0.5) / w, (y + 0.5) / h) of every cell of every (h, w) grid, row-major:
    (1, sum h*w, 1, 2), (x, y) last."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    return torch.cat(refs)[None, :, None]


def deform_inputs(h, w, device):
    """(reference points, spatial shapes, level starts) for a stage whose tokens form an (h, w) grid:
    the injector's queries are the tokens and its 3 value levels the prompt grids (2h, 2w), (h, w),
    (h/2, w/2); the extractor's queries are all prompt tokens and its one value level the token grid."""
    grids = [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    shapes = torch.as_tensor(grids, dtype=torch.long, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    inj = (reference_points([(h, w)], device), shapes, starts)
    ext = (reference_points(grids, device), shapes[1:2], shapes.new_zeros(1))
    return inj, ext


class DWConv(nn.Module):
    """One depth-wise 3x3 conv shared by the three prompt grids, whose tokens are 16n / 4n / n of N = 21n."""

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


class Injector(nn.Module):
    """Stage tokens read the prompts: x <- x + gamma * MSDA(LN(x), 3 levels of LN(p)). gamma starts at
    1e-6, so a new adapter leaves the source model's features (almost) unchanged."""

    def __init__(self, dim, heads, n_points, ratio, init_values):
        super().__init__()
        self.query_norm, self.feat_norm = _norm(dim), _norm(dim)
        self.attn = MSDeformAttn(dim, 3, heads, n_points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, p, ref, shapes, starts):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(p), shapes, starts)


class Extractor(nn.Module):
    """Prompts read the stage tokens: p <- p + MSDA(LN(p), LN(x)); p <- p + DropPath(ConvFFN(LN(p)))."""

    def __init__(self, dim, heads, n_points, ratio, cffn_ratio, drop_path):
        super().__init__()
        self.query_norm, self.feat_norm = _norm(dim), _norm(dim)
        self.attn = MSDeformAttn(dim, 1, heads, n_points, ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = _norm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, p, x, ref, shapes, starts, h, w):
        p = p + self.attn(self.query_norm(p), ref, self.feat_norm(x), shapes, starts)
        return p + self.drop_path(self.ffn(self.ffn_norm(p), h, w))


class PromptInteraction(nn.Module):
    """One prompt interactor per stage: extractor, then injector (ViT-Adapter: injector, blocks, extractor),
    then three stride-2 convs (up_layer1..3, no bias) that turn this stage's INPUT prompts into the next
    stage's. The extractor's output only feeds the injector (official code; spec 2.3 step 4)."""

    def __init__(self, dim, next_dim, heads, n_points, ratio, init_values, drop_path, cffn_ratio=0.25):
        super().__init__()
        self.injector = Injector(dim, heads, n_points, ratio, init_values)
        self.extractor = Extractor(dim, heads, n_points, ratio, cffn_ratio, drop_path)
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
        for up, t, (gh, gw) in zip((self.up_layer1, self.up_layer2, self.up_layer3), prompts,
                                   [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]):
            t = t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)   # (B, n, d) -> (B, d, gh, gw)
            nxt.append(up(t).flatten(2).transpose(1, 2))             # -> (B, n/4, d_next)
        return x, nxt


def adapter_init(m):
    """The official _init_weights on spm / interactions: Linear trunc_normal(.02) and zero bias, LN and BN
    1 / 0, convs normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups and zero bias."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


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
                            "multiple of 128 (its half-scale forward too) and a --test-scale that gives multiples of 64")
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
