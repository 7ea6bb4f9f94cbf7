"""Encoder-decoder segmentor, its loss, whole-image and sliding-window inference, and the evaluation loop.

Reference: mmseg's EncoderDecoder (`encode_decode`, `slide_inference`, `whole_inference`) and
CrossEntropyLoss with ``avg_non_ignore=False``: the mean runs over ALL pixels, ignored ones adding 0.
Attribute names (backbone, decode_head, auxiliary_head) are mmseg's so checkpoints keep their prefixes.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .metrics import SegMetric


def resize(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class EncoderDecoder(nn.Module):
    """backbone(img) -> list of maps; decode_head(maps) -> logits at stride 4; optional auxiliary_head."""

    def __init__(self, backbone, decode_head, auxiliary_head=None, aux_weight=0.4):
        super().__init__()
        self.backbone, self.decode_head, self.auxiliary_head = backbone, decode_head, auxiliary_head
        self.aux_weight = aux_weight

    def forward(self, img, label=None):
        """Without label: logits resized to the input size, (B, K, H, W) (mmseg's encode_decode).
        With label (B, H, W): (total loss, dict of the parts) = decode + aux_weight * aux. One forward
        for both, so DistributedDataParallel sees the training pass."""
        if label is None:
            return resize(self.decode_head(self.backbone(img)), img.shape[2:])
        feats = self.backbone(img)
        losses = {"loss_decode": seg_loss(self.decode_head(feats), label)}
        if self.auxiliary_head is not None:
            losses["loss_aux"] = self.aux_weight * seg_loss(self.auxiliary_head(feats), label)
        return sum(losses.values()), losses


def seg_loss(logits, label, ignore_index=255):
    """Cross-entropy of logits (B, K, h, w) upsampled to the label size (B, H, W); the mean is over every
    pixel, ignored ones included as zeros (mmseg avg_non_ignore=False)."""
    logits = resize(logits, label.shape[-2:])
    return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none").mean()


def pad_batch(img, label, size):
    """Pads a batch right/bottom to ``size`` (image 0 after normalisation, label 255): mmseg's Pad in the
    data pre-processor."""
    ph, pw = size[0] - img.shape[-2], size[1] - img.shape[-1]
    if ph > 0 or pw > 0:
        img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
        label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=255)
    return img, label


def collate_single(batch):
    """Evaluation loader collate for batch 1 of any image size: adds the batch dimension."""
    (s,) = batch
    return {"img": s["img"][None], "label": s["label"][None], "name": [s["name"]]}


@torch.no_grad()
def slide_inference(model, img, num_classes, crop, stride, pad_windows=False):
    """mmseg slide_inference: windows of ``crop`` every ``stride`` (the last one clamped to the border),
    logits summed and divided by the number of windows covering each pixel. img (B, 3, H, W) ->
    (B, K, H, W). ``pad_windows`` pads a window smaller than the crop (image smaller than the crop) for
    models that need a fixed input size."""
    (hc, wc), (hs, ws) = crop, stride
    b, _, h, w = img.shape
    hg = max(h - hc + hs - 1, 0) // hs + 1
    wg = max(w - wc + ws - 1, 0) // ws + 1
    logits = img.new_zeros((b, num_classes, h, w))
    count = img.new_zeros((1, 1, h, w))
    for i in range(hg):
        for j in range(wg):
            y1, x1 = i * hs, j * ws
            y2, x2 = min(y1 + hc, h), min(x1 + wc, w)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            win = img[:, :, y1:y2, x1:x2]
            if pad_windows and (win.shape[2] < hc or win.shape[3] < wc):
                out = model(F.pad(win, (0, wc - win.shape[3], 0, hc - win.shape[2])))[:, :, :y2 - y1, :x2 - x1]
            else:
                out = model(win)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict(model, img, ori_size, num_classes, mode="whole", crop=None, stride=None, pad_windows=False):
    """Class probabilities at the original image size, (B, K, H0, W0): whole or slide inference on the
    test-resized image, bilinear resize of the logits to the original size, softmax."""
    if mode == "slide":
        logits = slide_inference(model, img, num_classes, crop, stride, pad_windows)
    elif mode == "whole":
        logits = model(img)
    else:
        raise ValueError(f"unknown inference mode {mode!r} (expected 'whole' or 'slide')")
    return resize(logits, ori_size).softmax(dim=1)


@torch.no_grad()
def evaluate(model, loader, num_classes, device, infer=None, show_progress=True, vis=None):
    """Runs ``infer(model, img, ori_size) -> probs (1, K, H0, W0)`` over the loader (batch 1, any sizes),
    accumulates per-class areas, sums them over processes and returns the metric dict. ``vis`` is an
    optional callable(name, pred, label) that writes a picture (the caller decides how many)."""
    infer = infer or (lambda m, x, size: predict(m, x, size, num_classes))
    was_training = model.training
    model.eval()
    metric = SegMetric(num_classes, device=device)
    for sample in tqdm(loader, desc="eval", disable=not show_progress, leave=False):
        img, label = sample["img"].to(device), sample["label"].to(device)
        pred = infer(model, img, label.shape[-2:]).argmax(dim=1)  # (1, H0, W0)
        metric.update(pred, label)
        if vis is not None:
            name = sample["name"][0] if isinstance(sample["name"], (list, tuple)) else sample["name"]
            vis(name, pred[0].cpu(), label[0].cpu())
    model.train(was_training)
    return metric.reduce().compute()


def overlay_writer(out_dir, dataset, palette, limit=8, names=None):
    """A ``vis`` callable for evaluate(): writes ``out_dir/<name>.png``, image | ground truth | prediction
    with a legend (common.palettes.comparison), for the first ``limit`` images. The dataset re-reads the
    original image by name; ``names`` are the class names (default: the dataset's, else numbers)."""
    from .palettes import comparison, save_image
    from .seg_data import imread
    paths = {os.path.splitext(os.path.basename(p))[0]: p for p, _ in getattr(dataset, "items", [])}
    names = names or getattr(dataset, "classes", None) or [str(k) for k in range(len(palette))]
    written = []

    def vis(name, pred, label):
        if len(written) >= limit:
            return
        img = imread(paths[name]) if name in paths else dataset.original_image(name)
        save_image(os.path.join(out_dir, f"{name}.png"), comparison(img, label.numpy(), pred.numpy(), palette, names))
        written.append(name)
    return vis
