"""Segmentation data for the scripts: the official dataset layouts, mmseg's train and test pipelines
written on numpy + torch (cv2 is not a dependency), a synthetic dataset a model can learn, and readers
that fail with one clear message.

Faithful to mmsegmentation 1.x and the mmcv image ops beneath it:
- datasets: ``mmseg/datasets/{voc,ade,coco_stuff,pascal_context,cityscapes}.py`` and the configs in
  ``configs/_base_/datasets/`` (folders, suffixes, split files, reduce_zero_label). ``voc_aug`` is
  ``pascal_voc12_aug.py``: train.txt with SegmentationClass plus aug.txt with SegmentationClassAug
  (10,582 images once ``tools/dataset_converters/voc_aug.py`` has run), val as ``voc``.
- ``LoadAnnotations``: label PNGs read as raw indices (a 'P' PNG gives its palette indices);
  reduce_zero_label maps 0 -> 255, k -> k-1, 255 stays 255.
- ``RandomResize(scale, ratio_range, keep_ratio=True)``: r ~ U(ratio_range), target (int(L*r), int(S*r)),
  then mmcv ``imrescale``: factor = min(long/max(h, w), short/min(h, w)), size int(x*factor + 0.5);
  image bilinear (cv2 INTER_LINEAR on uint8 = half-pixel bilinear, rounded back to uint8), label
  nearest (cv2 INTER_NEAREST: source index floor(i * src/dst)).
- ``RandomCrop(crop, cat_max_ratio=0.75)``: offsets uniform in [0, H-ch] x [0, W-cw] (crop clipped to
  the image); a crop is re-drawn up to 10 times while its most frequent non-255 class covers >= 75 % of
  the non-255 pixels or it holds fewer than two classes; after 10 failures the last drawn crop is kept.
- ``RandomFlip(prob=0.5)``: horizontal, image and label together.
- ``PhotoMetricDistortion``: on uint8, each step with p=0.5; brightness +U(-32, 32), contrast
  xU(0.5, 1.5) either second (mode 1) or last (mode 0), saturation xU(0.5, 1.5) and hue +randint(-18, 18)
  (upper bound excluded, as numpy's randint) in OpenCV's uint8 HSV (H in 0..179 = degrees / 2, S and V
  in 0..255), every step truncated back to uint8 as mmseg's ``convert`` does. mmseg calls
  ``cv2.cvtColor(BGR2HSV / HSV2BGR)`` on the uint8 image; ours re-implements OpenCV's uint8 formulas
  (fixed-point RGB->HSV, float HSV->RGB, rounding to nearest) on RGB, which gives the same HSV values,
  so the operation is mmseg's up to the channel order of the array.
- ``SegDataPreProcessor``: RGB, (x - mean) / std, pad right/bottom to the crop with 0 (image, after
  normalisation) and 255 (label).
- test: ``Resize(scale, keep_ratio=True)`` bilinear, then optionally ViT-Adapter's
  ``ResizeToMultiple(size_divisor)`` (mmcv ``imresize_to_multiple``: each side rounded up to a multiple,
  bilinear, applied to the already resized image); the label stays at the original size.

Random numbers come from ``numpy.random.Generator`` objects given to the transforms, so a sample is a
pure function of (index, sample_seed); the draws are the same kinds as mmseg's, not the same stream.
"""
import colorsys
import math
import os

import numpy as np
import torch
from PIL import Image

from .io import UserError

MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
STD = (58.395, 57.12, 57.375)
IGNORE = 255


# ----------------------------------------------------------------------------------------------------
# the datasets as the official configs lay them out

# id -> trainId of cityscapesScripts' labels.py; every other id is ignored
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# Each split is a list of parts (image folder, label folder, split file or None = every image in the
# folder), relative to the dataset root; "train" of voc_aug has two parts, as mmseg concatenates them.
DATASETS = {
    "voc": dict(
        num_classes=21, reduce_zero_label=False, palette="voc", img_suffix=".jpg", label_suffix=".png",
        splits=dict(train=[("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt")],
                    val=[("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt")]),
        sizes=dict(train=1464, val=1449), root_name="VOCdevkit/VOC2012",
        description="PASCAL VOC 2012: 20 classes + background, palette PNGs, 255 = object borders"),
    "voc_aug": dict(
        num_classes=21, reduce_zero_label=False, palette="voc", img_suffix=".jpg", label_suffix=".png",
        splits=dict(train=[("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt"),
                           ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation/aug.txt")],
                    val=[("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt")]),
        sizes=dict(train=10582, val=1449), root_name="VOCdevkit/VOC2012",
        description="PASCAL VOC 2012 + SBD (mmseg's voc_aug converter): train.txt and aug.txt for training"),
    "ade20k": dict(
        num_classes=150, reduce_zero_label=True, palette="ade20k", img_suffix=".jpg", label_suffix=".png",
        splits=dict(train=[("images/training", "annotations/training", None)],
                    val=[("images/validation", "annotations/validation", None)]),
        sizes=dict(train=20210, val=2000), root_name="ADEChallengeData2016",
        description="ADE20K (SceneParsing 150): labels 1..150, 0 = other -> ignored"),
    "coco_stuff10k": dict(
        num_classes=171, reduce_zero_label=True, palette="coco_stuff", img_suffix=".jpg",
        label_suffix="_labelTrainIds.png",
        splits=dict(train=[("images/train2014", "annotations/train2014", None)],
                    val=[("images/test2014", "annotations/test2014", None)]),
        sizes=dict(train=9000, val=1000), root_name="coco_stuff10k",
        description="COCO-Stuff 10k after mmseg's converter: ids 1..171, 0 = unlabelled -> ignored"),
    "coco_stuff164k": dict(
        num_classes=171, reduce_zero_label=False, palette="coco_stuff", img_suffix=".jpg",
        label_suffix="_labelTrainIds.png",
        splits=dict(train=[("images/train2017", "annotations/train2017", None)],
                    val=[("images/val2017", "annotations/val2017", None)]),
        sizes=dict(train=118287, val=5000), root_name="coco_stuff164k",
        description="COCO-Stuff 164k after mmseg's converter: train ids 0..170, 255 = unlabelled"),
    "pascal_context59": dict(
        num_classes=59, reduce_zero_label=True, palette="pascal_context", img_suffix=".jpg",
        label_suffix=".png",
        splits=dict(train=[("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt")],
                    val=[("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt")]),
        sizes=dict(train=4998, val=5105), root_name="VOCdevkit/VOC2010",
        description="PASCAL Context 59 after mmseg's converter: 1..59, 0 = background -> ignored"),
    "cityscapes": dict(
        num_classes=19, reduce_zero_label=False, palette="cityscapes", img_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
        splits=dict(train=[("leftImg8bit/train", "gtFine/train", None)],
                    val=[("leftImg8bit/val", "gtFine/val", None)]),
        sizes=dict(train=2975, val=500), root_name="cityscapes",
        # without the converter's *_labelTrainIds.png, the raw *_labelIds.png are mapped on the fly
        fallback=("_gtFine_labelIds.png", CITYSCAPES_ID_TO_TRAINID),
        description="Cityscapes fine: 19 train ids, 255 = ignore"),
    "synthetic": dict(
        num_classes=6, reduce_zero_label=False, palette="synthetic", sizes=dict(train=64, val=16),
        description="SyntheticSeg: textured shapes on a textured background, generated on the fly"),
}


def build_dataset(name, root, split, transform, num_samples=None):
    """The dataset ``name`` (a key of DATASETS) at ``root`` for split 'train' or 'val'. ``num_samples``
    keeps the first n samples (quick runs); for 'synthetic' it is the number generated."""
    if name not in DATASETS:
        raise UserError(f"--dataset {name!r} is not known; expected one of {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise UserError(f"split {split!r} of dataset {name!r}: expected 'train' or 'val'")
    spec = DATASETS[name]
    if name == "synthetic":
        n = num_samples or spec["sizes"][split]
        return SyntheticSeg(n, spec["num_classes"], split=split, transform=transform)
    items = _list_items(name, root, split)
    if num_samples:
        items = items[:num_samples]
    return SegDataset(items, spec["num_classes"], spec["reduce_zero_label"], transform, name=name,
                      label_maps=_label_maps(spec))


def _label_maps(spec):
    """{label suffix: id -> class lookup table} for labels that need mapping when read."""
    if "fallback" not in spec:
        return {}
    suffix, mapping = spec["fallback"]
    lut = np.full(max(mapping) + 1, IGNORE, dtype=np.int64)  # ids past the table cannot occur
    for k, v in mapping.items():
        lut[k] = v
    return {suffix: lut}


def _expected_layout(name):
    spec = DATASETS[name]
    parts = sorted({p for s in spec["splits"].values() for part in s for p in part if p})
    return f"{spec['root_name']}/ holding {', '.join(parts)}"


def _files_under(folder, suffix):
    """Relative paths of the files under ``folder`` (recursively) ending with ``suffix``, sorted."""
    out = []
    for d, _, files in os.walk(folder, followlinks=True):
        rel = os.path.relpath(d, folder)
        out.extend(os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(suffix))
    return sorted(out)


def _list_items(name, root, split):
    spec = DATASETS[name]
    if root is None or not os.path.isdir(root):
        raise UserError(f"--data-root {root} for dataset '{name}' is not a folder; expected "
                        f"{_expected_layout(name)}")
    fallback = spec.get("fallback", (None, None))[0]
    items = []
    for img_dir, label_dir, list_file in spec["splits"][split]:
        for sub in (img_dir, label_dir):
            if not os.path.isdir(os.path.join(root, sub)):
                raise UserError(f"dataset '{name}': folder {os.path.join(root, sub)} not found; expected "
                                f"{_expected_layout(name)} (is --data-root the {spec['root_name']} folder?)")
        img_dir, label_dir = os.path.join(root, img_dir), os.path.join(root, label_dir)
        images = _files_under(img_dir, spec["img_suffix"])
        labels = set(_files_under(label_dir, ".png"))
        if list_file is None:
            stems = [f[:-len(spec["img_suffix"])] for f in images]
            if not stems:
                raise UserError(f"dataset '{name}': no *{spec['img_suffix']} images under {img_dir}")
        else:
            path = os.path.join(root, list_file)
            if not os.path.isfile(path):
                raise UserError(f"dataset '{name}': split file {path} not found; expected one image "
                                f"name per line (names of {img_dir}/*{spec['img_suffix']})")
            with open(path) as f:
                stems = [line.strip() for line in f if line.strip()]
            if not stems:
                raise UserError(f"dataset '{name}': split file {path} lists no images")
            have = set(images)
            for s in stems:
                if s + spec["img_suffix"] not in have:
                    raise UserError(f"dataset '{name}': image {os.path.join(img_dir, s + spec['img_suffix'])}"
                                    f" listed in {path} not found")
        for s in stems:
            label = s + spec["label_suffix"]
            if label not in labels:
                if fallback and s + fallback in labels:
                    label = s + fallback
                else:
                    alt = f" (or {s + fallback})" if fallback else ""
                    raise UserError(f"dataset '{name}': label {os.path.join(label_dir, label)}{alt} for image "
                                    f"{os.path.join(img_dir, s + spec['img_suffix'])} not found")
            items.append((os.path.join(img_dir, s + spec["img_suffix"]), os.path.join(label_dir, label)))
    return items


# ----------------------------------------------------------------------------------------------------
# reading files

def imread(path):
    """(H, W, 3) uint8 RGB. Greyscale / CMYK / palette images are converted, as cv2's IMREAD_COLOR does;
    16-bit greyscale (PIL modes I;16*, or I with values past 255) keeps its high byte, as cv2 does
    (PIL's convert("RGB") would clip it to white)."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):
                v = np.asarray(im).astype(np.int64)  # (H, W)
                if v.size and (v.min() < 0 or v.max() > 65535):
                    raise UserError(f"image {path} holds values outside 0..65535 (mode {im.mode}); expected an "
                                    "8- or 16-bit image")
                if im.mode.startswith("I;16") or (v.size and v.max() > 255):
                    v = v >> 8
                return np.repeat(v.astype(np.uint8)[..., None], 3, axis=2)
            if im.mode == "F":
                raise UserError(f"image {path} is a floating-point image; expected an 8- or 16-bit image")
            return np.array(im.convert("RGB"))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image {path} not found") from None
    except Exception as e:  # PIL raises OSError / UnidentifiedImageError / SyntaxError on bad files
        raise UserError(f"image {path} is not a readable image ({type(e).__name__}: {e}); "
                        "expected a JPEG or PNG") from None


def read_label(path, num_classes, reduce_zero_label, ignore_index=255, label_map=None):
    """Class indices of a label PNG, (H, W) uint8 (int64 if num_classes > 255): the raw values of a
    greyscale PNG or the palette indices of a 'P' PNG. ``label_map`` (a lookup table) maps raw ids to
    classes first (ids past its end are an error); then reduce_zero_label: 0 -> 255, k -> k-1.
    Every value must end in [0, num_classes) or be ``ignore_index``."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "I;16B", "1"):
                raise UserError(f"label {path} is a {im.mode} image; expected a single-channel PNG of "
                                "class indices (mode 'P' or 'L')")
            raw = np.array(im)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"label {path} not found") from None
    except Exception as e:
        raise UserError(f"label {path} is not a readable PNG ({type(e).__name__}: {e})") from None
    raw = raw.astype(np.int64)
    if label_map is not None:
        bad = (raw < 0) | (raw >= len(label_map))
        if bad.any():
            raise UserError(f"label {path} holds id(s) {np.unique(raw[bad])[:5].tolist()}; expected ids "
                            f"0..{len(label_map) - 1} of its format")
        raw = label_map[raw]
    lab = raw
    if reduce_zero_label:
        lab = np.where(raw == 0, ignore_index, raw - 1)
        lab[raw == ignore_index] = ignore_index
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        vals = np.unique(raw[bad])[:5].tolist()
        expect = (f"1..{num_classes} (0 = ignored, reduce_zero_label)" if reduce_zero_label
                  else f"0..{num_classes - 1}") + f" or {ignore_index}"
        raise UserError(f"label {path} holds value(s) {vals} out of range; expected {expect}")
    return lab.astype(np.uint8 if num_classes <= 255 else np.int64)


# ----------------------------------------------------------------------------------------------------
# geometry (mmcv imrescale / imresize with cv2 semantics)

def rescale_size(h, w, scale):
    """mmcv rescale_size with a (long, short) bound: the largest factor with long side <= max(scale) and
    short side <= min(scale); sides int(x * f + 0.5). Returns (new_h, new_w)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def _linear_taps(n_in, n_out, start, stop):
    """cv2 INTER_LINEAR along one axis for outputs start..stop-1: source x = (i + 0.5) * in/out - 0.5,
    clamped to the first / last pixel; returns the two source indices and the weight of the second."""
    src = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_bilinear(img, size, box=None):
    """(H, W, C) uint8 -> (h, w, C) uint8: half-pixel bilinear without antialiasing, rounded to nearest,
    as cv2 INTER_LINEAR. ``box`` = (y0, y1, x0, x1) computes only that window of the resized image (the
    same values as resizing everything and cropping, at the cost of the window)."""
    h, w = size
    y0, y1, x0, x1 = box if box is not None else (0, h, 0, w)
    if img.shape[:2] == (h, w):
        return img[y0:y1, x0:x1]
    r0, r1, fy = _linear_taps(img.shape[0], h, y0, min(y1, h))
    c0, c1, fx = _linear_taps(img.shape[1], w, x0, min(x1, w))
    rows = (img[r0].astype(np.float32) * (1 - fy)[:, None, None]
            + img[r1].astype(np.float32) * fy[:, None, None])                        # (h', W, C)
    out = rows[:, c0] * (1 - fx)[None, :, None] + rows[:, c1] * fx[None, :, None]    # (h', w', C)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _nearest_taps(n_in, n_out, start, stop):
    # cv2 INTER_NEAREST: floor(i * (1 / (out / in))), in double precision as OpenCV computes it
    return np.minimum(np.floor(np.arange(start, stop) * (1.0 / (n_out / n_in))).astype(np.int64), n_in - 1)


def resize_nearest(label, size, box=None):
    """(H, W) -> (h, w) with source index floor(i * src/dst), as cv2 INTER_NEAREST; ``box`` as above."""
    h, w = size
    y0, y1, x0, x1 = box if box is not None else (0, h, 0, w)
    if label.shape[:2] == (h, w):
        return label[y0:y1, x0:x1]
    ys = _nearest_taps(label.shape[0], h, y0, min(y1, h))
    xs = _nearest_taps(label.shape[1], w, x0, min(x1, w))
    return label[ys[:, None], xs[None, :]]


# ----------------------------------------------------------------------------------------------------
# photometric distortion (uint8 in, uint8 out, as mmseg)

def _convert(img, alpha=1.0, beta=0.0):
    """mmseg's PhotoMetricDistortion.convert: float32 x * alpha + beta, clipped, truncated to uint8."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def adjust_brightness(img, beta):
    return _convert(img, beta=beta)


def adjust_contrast(img, alpha):
    return _convert(img, alpha=alpha)


_HSV_SHIFT = 12
# OpenCV's uint8 RGB2HSV tables: round(255 * 2^12 / v) and round(180 * 2^12 / (6 * diff)); index 0 -> 0
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / np.arange(1, 256))]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256)))]).astype(np.int32)


def rgb_to_hsv_u8(img):
    """(H, W, 3) uint8 RGB -> uint8 HSV as cv2.cvtColor(COLOR_RGB2HSV): H in 0..179 (degrees / 2),
    S = 255 * (max - min) / max, V = max, in OpenCV's 12-bit fixed point."""
    rgb = img.astype(np.int32)  # products stay below 2^31: 255 * (255 << 12)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in C++ on ints
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# sector 0..5 of the hue circle (red->yellow, yellow->green, ...) -> which of (v, p, q, t) is r, g, b
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb_u8(hsv):
    """uint8 HSV (H in 0..179) -> (H, W, 3) uint8 RGB as cv2.cvtColor(COLOR_HSV2RGB): float32 sector
    formula, each channel rounded to nearest."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.fmod(h, np.float32(6.0))
    h = np.where(h < 0, h + np.float32(6.0), h)
    floor = np.floor(h)  # float32, so that f stays in float32 as in OpenCV
    f = np.where(floor >= 6, np.float32(0.0), h - floor)
    sector = np.where(floor >= 6, 0, floor.astype(np.int64))
    one = np.float32(1.0)
    # OpenCV's table: tab = (v, p, q, t); per sector the (r, g, b) entries of it
    tab = np.stack([v, v * (one - s), v * (one - s * f), v * (one - s * (one - f))])  # (4, H, W)
    rgb = np.take_along_axis(tab, _SECTOR_RGB[sector].transpose(2, 0, 1), axis=0)    # (3, H, W)
    rgb = np.where(s == 0, v, rgb).transpose(1, 2, 0)                                 # (H, W, 3)
    return np.clip(np.rint(rgb * np.float32(255.0)), 0, 255).astype(np.uint8)


def adjust_saturation(img, alpha):
    hsv = rgb_to_hsv_u8(img)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
    return hsv_to_rgb_u8(hsv)


def shift_hue(img, delta):
    """Adds ``delta`` in OpenCV units (2 degrees each) to the hue, modulo 180."""
    hsv = rgb_to_hsv_u8(img)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + delta) % 180
    return hsv_to_rgb_u8(hsv)


def photometric_distortion(img, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg PhotoMetricDistortion on a uint8 RGB image, with mmseg's order and probabilities."""
    if rng.integers(2):
        img = adjust_brightness(img, rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)  # 1: contrast second, 0: contrast last
    if mode == 1 and rng.integers(2):
        img = adjust_contrast(img, rng.uniform(*contrast_range))
    if rng.integers(2):
        img = adjust_saturation(img, rng.uniform(*saturation_range))
    if rng.integers(2):
        img = shift_hue(img, int(rng.integers(-hue_delta, hue_delta)))
    if mode == 0 and rng.integers(2):
        img = adjust_contrast(img, rng.uniform(*contrast_range))
    return img


# ----------------------------------------------------------------------------------------------------
# pipelines

def normalize(img, mean=MEAN, std=STD):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor, (x - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()  # (H, W, 3) -> (3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


class TrainTransform:
    """mmseg's train pipeline after loading: RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip ->
    PhotoMetricDistortion -> normalise -> pad to the crop. ``crop`` is (h, w); ``scale`` is the
    (long, short) bound of mmseg's img_scale; ``ratio_range=None`` resizes to ``scale`` exactly (keep
    ratio), as configs without a ratio range do; ``cat_max_ratio=1`` disables the crop check."""

    def __init__(self, scale=(2048, 512), crop=(640, 640), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, mean=MEAN, std=STD):
        self.scale, self.crop = tuple(scale), _pair(crop)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean, self.std = mean, std

    def resize_size(self, h, w, ratio):
        """Image size after RandomResize with the drawn ratio (mmcv: int() of the scaled bound)."""
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return rescale_size(h, w, scale)

    def _crop_box(self, h, w, rng):
        ch, cw = self.crop
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, y + ch, x, x + cw

    def _crop_ok(self, label):
        counts = np.bincount(label.ravel(), minlength=IGNORE + 1)
        counts[IGNORE] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, img, label, rng):
        # RandomResize
        h, w = img.shape[:2]
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
        else:
            ratio = 1.0
        size = self.resize_size(h, w, ratio)
        # RandomCrop with cat_max_ratio: first box, then up to 10 checks, each failure draws a new box.
        # Only the crop window of the resized image / label is computed: same values, less work.
        box = self._crop_box(*size, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._crop_ok(resize_nearest(label, size, box)):
                    break
                box = self._crop_box(*size, rng)
        img, label = resize_bilinear(img, size, box), resize_nearest(label, size, box)
        # RandomFlip
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        # normalise, then pad right/bottom to the crop (image 0 after normalisation, label 255)
        x = normalize(img, self.mean, self.std)
        ch, cw = self.crop
        out_img = torch.zeros(3, ch, cw)
        out_label = torch.full((ch, cw), IGNORE, dtype=torch.long)
        out_img[:, :x.shape[1], :x.shape[2]] = x
        out_label[:label.shape[0], :label.shape[1]] = torch.from_numpy(np.ascontiguousarray(label)).long()
        return out_img, out_label


class TestTransform:
    """mmseg's test pipeline: keep-ratio resize into ``scale`` (long, short), optionally ViT-Adapter's
    ResizeToMultiple(size_divisor), normalise. The label stays at the original size (metrics are
    computed there). ``scale=None`` keeps the image size."""
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, scale=(2048, 512), size_divisor=None, mean=MEAN, std=STD):
        self.scale = tuple(scale) if scale is not None else None
        self.size_divisor, self.mean, self.std = size_divisor, mean, std

    def output_size(self, h, w):
        if self.scale is not None:
            h, w = rescale_size(h, w, self.scale)
        if self.size_divisor:
            d = self.size_divisor
            h, w = math.ceil(h / d) * d, math.ceil(w / d) * d
        return h, w

    def __call__(self, img, label, rng=None):
        if self.scale is not None:
            img = resize_bilinear(img, rescale_size(*img.shape[:2], self.scale))
        if self.size_divisor:  # ResizeToMultiple works on the resized image: a second resize
            d = self.size_divisor
            img = resize_bilinear(img, tuple(math.ceil(s / d) * d for s in img.shape[:2]))
        return normalize(img, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(label)).long()


def _split_key(key):
    """dataset[i] or dataset[(i, sample_seed)] (common.dist.InfiniteSampler) -> (i, numpy Generator)."""
    if isinstance(key, (tuple, list)):
        index, seed = int(key[0]), int(key[1])
        return index, np.random.default_rng(seed)
    return int(key), np.random.default_rng()


# ----------------------------------------------------------------------------------------------------
# datasets

class SegDataset(torch.utils.data.Dataset):
    """(image, label) files -> dict(img (3, H, W) float, label (H, W) long, name, ori_size (H0, W0))."""

    def __init__(self, items, num_classes, reduce_zero_label, transform=None, name="custom", label_maps=None):
        self.items, self.num_classes, self.reduce_zero_label = list(items), num_classes, reduce_zero_label
        self.transform, self.name = transform, name
        self.label_maps = label_maps or {}  # label suffix -> lookup table (cityscapes labelIds)

    def __len__(self):
        return len(self.items)

    def load(self, index):
        """The decoded (image uint8 RGB, label) pair before any transform."""
        img_path, label_path = self.items[index]
        img = imread(img_path)
        lut = next((t for suf, t in self.label_maps.items() if label_path.endswith(suf)), None)
        label = read_label(label_path, self.num_classes, self.reduce_zero_label, label_map=lut)
        if label.shape != img.shape[:2]:
            raise UserError(f"label {label_path} is {label.shape[0]}x{label.shape[1]} but its image {img_path} "
                            f"is {img.shape[0]}x{img.shape[1]}; expected the same size")
        return img, label

    def __getitem__(self, key):
        index, rng = _split_key(key)
        img, label = self.load(index)
        ori = img.shape[:2]
        tf = self.transform or TestTransform(scale=None)
        x, y = tf(img, label, rng)
        name = os.path.splitext(os.path.basename(self.items[index][0]))[0]
        return dict(img=x, label=y, name=name, ori_size=tuple(ori))


def collate_eval(batch):
    """Test samples of different sizes: a dict of lists (img, label, name, ori_size) instead of stacks."""
    return {k: [s[k] for s in batch] for k in batch[0]}


def check_files(datasets, info, threads=8):
    """Before the first iteration: every image (and label) of ``datasets`` exists, its header opens and a
    label has its image's size. Headers only (fast), spread over the processes and threads; synthetic
    sets have no files. Raises one UserError (the same on every process) naming the first bad file."""
    from .dist import check_in_parallel
    items = [it for ds in datasets if ds is not None for it in getattr(ds, "items", [])]
    bad = check_in_parallel(items, _check_pair, info, threads)
    if bad:
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise UserError(f"{bad[0][1]}{more}; found by the data check before training "
                        "(--skip-data-check skips it)", all_ranks=True)
    return len(items)


def _header_size(path, kind):
    """(W, H) of an image file from its header, or the reason it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return f"{kind} {path} not found"
    except Exception as e:  # PIL: UnidentifiedImageError / OSError / SyntaxError on damaged files
        return f"{kind} {path} is not a readable image ({type(e).__name__}: {e})"


def _check_pair(item):
    img, label = item
    size = _header_size(img, "image")
    if isinstance(size, str) or label is None:
        return size if isinstance(size, str) else None
    lsize = _header_size(label, "label")
    if isinstance(lsize, str):
        return lsize
    if lsize != size:
        return (f"label {label} is {lsize[1]}x{lsize[0]} but its image {img} is {size[1]}x{size[0]}; "
                "expected the same size")
    return None


# ----------------------------------------------------------------------------------------------------
# a synthetic dataset a small model can learn

SHAPES = ("disc", "square", "triangle", "ring", "cross", "ellipse", "half disc", "bar")
TEXTURES = ("flat", "hstripes", "checker", "dots", "vstripes", "diagonal", "grid", "speckle")


def _class_colour(k):
    """Mean RGB of class k >= 1. Classes 2j+1 and 2j+2 share a colour: only shape and texture tell them
    apart, so a per-pixel colour classifier cannot be perfect."""
    hue = ((k - 1) // 2) * 0.381966 % 1.0  # golden-angle steps: well separated hues
    return np.array(colorsys.hsv_to_rgb(hue, 0.7, 0.85)) * 255.0


def _texture(kind, yy, xx, rng):
    """(H, W) pattern in {0, 1} (or 0.5 for flat) in image coordinates, period 6 px."""
    if kind == "flat":
        return np.full(yy.shape, 0.5)
    if kind == "hstripes":
        return ((yy // 3) % 2).astype(float)
    if kind == "vstripes":
        return ((xx // 3) % 2).astype(float)
    if kind == "checker":
        return ((yy // 3 + xx // 3) % 2).astype(float)
    if kind == "dots":
        return ((yy % 6 < 3) & (xx % 6 < 3)).astype(float)
    if kind == "diagonal":
        return (((yy + xx) // 3) % 2).astype(float)
    if kind == "grid":
        return ((yy % 6 == 0) | (xx % 6 == 0)).astype(float)
    return (rng.random(yy.shape) < 0.5).astype(float)  # speckle


def _shape_mask(kind, yy, xx, cy, cx, r, theta):
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)   # object frame
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    d2 = u * u + v * v
    if kind == "disc":
        return d2 <= r * r
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    if kind == "triangle":  # equilateral, inradius r/2
        m = np.ones(u.shape, dtype=bool)
        for i in range(3):
            a = 2 * math.pi * i / 3
            m &= u * math.cos(a) + v * math.sin(a) <= 0.5 * r
        return m
    if kind == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        return ((abs(u) <= 0.3 * r) & (abs(v) <= r)) | ((abs(v) <= 0.3 * r) & (abs(u) <= r))
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    if kind == "half disc":
        return (d2 <= r * r) & (v >= 0)
    return (abs(u) <= r) & (abs(v) <= 0.25 * r)  # bar


class SyntheticSeg(torch.utils.data.Dataset):
    """Textured shapes on a textured background, generated from (seed, split, index): needs no files.

    Class 0 is the background: a random colour per image (over the whole range the objects use) with a
    smooth wave pattern. Class k >= 1 is shape SHAPES[(k-1) % 8] with texture TEXTURES[(k-1) % 8] and a
    class colour that it shares with one other class; colours get per-object jitter and per-pixel noise.
    1-4 objects per image at random places, sizes and angles (later ones occlude earlier ones); the first
    object of sample i is class 1 + i % (K-1), so every class shows up in any K-1 consecutive samples.
    Samples go through ``transform`` like SegDataset's; ``key`` may be (index, sample_seed)."""

    def __init__(self, num_samples=64, num_classes=6, size=(128, 128), split="train", transform=None, seed=0):
        if num_classes < 2:
            raise UserError(f"SyntheticSeg needs num_classes >= 2 (background + one shape), got {num_classes}")
        if split not in ("train", "val"):
            raise UserError(f"SyntheticSeg split {split!r}: expected 'train' or 'val'")
        self.num_samples, self.num_classes, self.size = num_samples, num_classes, _pair(size)
        self.split, self.transform, self.seed = split, transform, seed
        self.name, self.reduce_zero_label = "synthetic", False
        self.classes = ["background"] + [SHAPES[(k - 1) % len(SHAPES)] + (f" {(k - 1) // len(SHAPES) + 1}"
                                         if k > len(SHAPES) else "") for k in range(1, num_classes)]

    def __len__(self):
        return self.num_samples

    def generate(self, index):
        """(image uint8 (H, W, 3) RGB, label uint8 (H, W)) of sample ``index``."""
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        H, W = self.size
        yy, xx = np.mgrid[0:H, 0:W].astype(float)
        # background: random colour, two smooth waves, noise
        base = rng.uniform(40, 215, size=3)
        wave = sum(np.sin(2 * math.pi * (fy * yy / H + fx * xx / W) + ph) for fy, fx, ph in
                   rng.uniform([-2, -2, 0], [2, 2, 2 * math.pi], size=(2, 3)))
        img = base + 18.0 * wave[..., None] * rng.uniform(0.5, 1.0, size=3)
        label = np.zeros((H, W), dtype=np.uint8)
        n_obj = int(rng.integers(1, 5))
        for j in range(n_obj):
            k = 1 + index % (self.num_classes - 1) if j == 0 else int(rng.integers(1, self.num_classes))
            r = rng.uniform(0.12, 0.28) * min(H, W)
            cy, cx = rng.uniform(0.15, 0.85) * H, rng.uniform(0.15, 0.85) * W
            mask = _shape_mask(SHAPES[(k - 1) % len(SHAPES)], yy, xx, cy, cx, r, rng.uniform(0, math.pi))
            pattern = _texture(TEXTURES[(k - 1) % len(TEXTURES)], yy, xx, rng)
            colour = _class_colour(k) + rng.normal(0, 15, size=3)
            obj = colour + 45.0 * (pattern[..., None] - 0.5) * 2 * rng.uniform(0.7, 1.0)
            img = np.where(mask[..., None], obj, img)
            label[mask] = k
        img = img + rng.normal(0, 8, size=img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), label

    def original_image(self, name):
        """The untransformed RGB image of a sample name (for overlays)."""
        return self.generate(int(name.rsplit("_", 1)[1]))[0]

    def __getitem__(self, key):
        index, rng = _split_key(key)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"SyntheticSeg index {index} out of range [0, {self.num_samples})")
        img, label = self.generate(index)
        tf = self.transform or TestTransform(scale=None)
        x, y = tf(img, label, rng)
        return dict(img=x, label=y, name=f"synthetic_{self.split}_{index:06d}", ori_size=self.size)
