"""Geometry and photometric transforms of mmseg's train and test pipelines, written on numpy + torch
(cv2 is not a dependency). Datasets live in common/seg_data.py, which re-exports every name here.

Faithful to mmsegmentation 1.x and the mmcv image ops beneath it:
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
import math

import numpy as np
import torch

MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
STD = (58.395, 57.12, 57.375)
IGNORE = 255


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
    ratio), as configs without a ratio range do; ``cat_max_ratio=1`` disables the crop check.

    ``apply`` also returns the geometry, ``meta = dict(box=(y1, y2, x1, x2), flip, size=(h, w))``: the
    crop window in the frame of the resized image of size (h, w) (clipped to it), then the horizontal
    flip. The unpadded part of the output, ``label[:y2 - y1, :x2 - x1]``, is
    ``resize_nearest(label, size)[y1:y2, x1:x2]``, mirrored if ``flip``; the rest is padding (255)."""

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
        return self.apply(img, label, rng)[:2]

    def apply(self, img, label, rng):
        """-> (img (3, ch, cw) float, label (ch, cw) long, meta)."""
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
        flip = bool(rng.random() < self.flip_prob)
        if flip:
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
        y1, y2, x1, x2 = box
        meta = dict(box=(y1, min(y2, size[0]), x1, min(x2, size[1])), flip=flip, size=tuple(size))
        return out_img, out_label, meta


class TestTransform:
    """mmseg's test pipeline: keep-ratio resize into ``scale`` (long, short), optionally ViT-Adapter's
    ResizeToMultiple(size_divisor), normalise. The label stays at the original size (metrics are
    computed there). ``scale=None`` keeps the image size. ``apply`` also returns the identity geometry
    of the output image (h, w): ``meta = dict(box=(0, h, 0, w), flip=False, size=(h, w))``."""
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
        return self.apply(img, label, rng)[:2]

    def apply(self, img, label, rng=None):
        if self.scale is not None:
            img = resize_bilinear(img, rescale_size(*img.shape[:2], self.scale))
        if self.size_divisor:  # ResizeToMultiple works on the resized image: a second resize
            d = self.size_divisor
            img = resize_bilinear(img, tuple(math.ceil(s / d) * d for s in img.shape[:2]))
        h, w = img.shape[:2]
        meta = dict(box=(0, h, 0, w), flip=False, size=(h, w))
        return normalize(img, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(label)).long(), meta


def apply_transform(transform, img, label, rng):
    """(img, label, meta) from a transform: ``transform.apply`` when it has one; a plain callable
    ``(img, label, rng) -> (img, label)`` is taken to keep the geometry (identity meta of its output)."""
    if hasattr(transform, "apply"):
        return transform.apply(img, label, rng)
    x, y = transform(img, label, rng)
    h, w = x.shape[-2:]
    return x, y, dict(box=(0, h, 0, w), flip=False, size=(h, w))
