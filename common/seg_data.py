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
- domain adaptation (DAFormer's converters ``tools/convert_datasets/{gta,synthia,cityscapes}.py`` and
  ATP's ``mmseg/datasets/acdc.py``): ``gta5`` labels are Cityscapes label ids, ``synthia`` labels
  16-bit PNGs with the SYNTHIA class id in the R channel, ``acdc_<condition>`` labels ``*_gt_labelTrainIds.png``.
  Every raw label is mapped to the 19 Cityscapes train ids when read, so the converters need not run;
  their output (``*_labelTrainIds.png``) is read as it is when present.
- transforms: see common/seg_transforms.py (re-exported here).

Random numbers come from ``numpy.random.Generator`` objects given to the transforms, so a sample is a
pure function of (index, sample_seed); the draws are the same kinds as mmseg's, not the same stream.
"""
import colorsys
import math
import os

import numpy as np
import png  # pypng: 16-bit RGB PNGs (SYNTHIA labels), which PIL reduces to 8 bits
import torch
from PIL import Image

from .io import UserError
# the transforms moved to seg_transforms.py; every name stays importable from here
from .seg_transforms import (IGNORE, MEAN, STD, TestTransform, TrainTransform, _pair,  # noqa: F401
                             adjust_brightness, adjust_contrast, adjust_saturation, apply_transform,
                             hsv_to_rgb_u8, normalize, photometric_distortion, rescale_size, resize_bilinear,
                             resize_nearest, rgb_to_hsv_u8, shift_hue)


# ----------------------------------------------------------------------------------------------------
# the datasets as the official configs lay them out

# id -> trainId of cityscapesScripts' labels.py; every other id is ignored
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# SYNTHIA class id (R channel of GT/LABELS/*.png) -> Cityscapes trainId, as DAFormer's / Uni-UVPT's
# tools/convert_datasets/synthia.py (16, 18, 20 -> terrain, truck, train: listed there, absent in the data)
SYNTHIA_ID_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
                         8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")

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
        fallback=dict(suffix="_gtFine_labelIds.png", ids=CITYSCAPES_ID_TO_TRAINID, id_range=34),
        description="Cityscapes fine: 19 train ids, 255 = ignore"),
    "gta5": dict(
        num_classes=19, reduce_zero_label=False, palette="cityscapes", img_suffix=".png",
        label_suffix="_labelTrainIds.png", splits=dict(train=[("images", "labels", None)]),
        sizes=dict(train=24966), root_name="gta5",
        # labels/*.png: 'P' PNGs of Cityscapes label ids; the converter maps every other value to 255
        fallback=dict(suffix=".png", ids=CITYSCAPES_ID_TO_TRAINID, id_range=256),
        description="GTA5 (Richter et al.): Cityscapes label ids -> 19 train ids, one split of all images"),
    "synthia": dict(
        num_classes=19, reduce_zero_label=False, palette="cityscapes", img_suffix=".png",
        label_suffix="_labelTrainIds.png", splits=dict(train=[("RGB", "GT/LABELS", None)]),
        sizes=dict(train=9400), root_name="RAND_CITYSCAPES",
        fallback=dict(suffix=".png", ids=SYNTHIA_ID_TO_TRAINID, id_range=65536, png16=True),
        description="SYNTHIA-RAND-CITYSCAPES: 16 of the 19 Cityscapes classes (no terrain, truck, train); "
                    "report mIoU16 / mIoU13 (common.metrics.SYNTHIA16 / SYNTHIA13)"),
    **{f"acdc_{c}": dict(
        num_classes=19, reduce_zero_label=False, palette="cityscapes", img_suffix="_rgb_anon.png",
        label_suffix="_gt_labelTrainIds.png",
        splits={s: [(f"rgb_anon/{c}/{s}", f"gt/{c}/{s}", None)] for s in ("train", "val")},
        sizes=dict(train=400, val=106 if c == "night" else 100), root_name="ACDC",
        fallback=dict(suffix="_gt_labelIds.png", ids=CITYSCAPES_ID_TO_TRAINID, id_range=34),
        description=f"ACDC {c}: Cityscapes train ids; each condition a target domain of its own")
       for c in ACDC_CONDITIONS},
    "synthetic": dict(
        num_classes=6, reduce_zero_label=False, palette="synthetic", sizes=dict(train=64, val=16),
        description="SyntheticSeg: textured shapes on a textured background, generated on the fly"),
}


def build_dataset(name, root, split, transform, num_samples=None, with_labels=True):
    """The dataset ``name`` (a key of DATASETS) at ``root`` for ``split`` (a key of its "splits":
    'train' and 'val', or 'train' only for gta5 / synthia). ``num_samples`` keeps the first n samples
    (quick runs); for 'synthetic' it is the number generated. ``with_labels=False`` neither needs nor
    opens a label file: each label is all 255 (ignored) at the image size, ``items`` hold None."""
    if name not in DATASETS:
        raise UserError(f"--dataset {name!r} is not known; expected one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    splits = spec.get("splits", spec["sizes"])
    if split not in splits:
        raise UserError(f"split {split!r} of dataset {name!r}: expected {' or '.join(map(repr, splits))}")
    if name == "synthetic":
        n = num_samples or spec["sizes"][split]
        return SyntheticSeg(n, spec["num_classes"], split=split, transform=transform, with_labels=with_labels)
    items = _list_items(name, root, split, with_labels)
    if num_samples:
        items = items[:num_samples]
    return SegDataset(items, spec["num_classes"], spec["reduce_zero_label"], transform, name=name,
                      label_maps=_label_maps(spec))


def _label_maps(spec):
    """{label suffix: None (read as it is) or dict(lut=id -> class table, png16=bool)}; a label file
    takes the rule of the longest suffix it ends with, so '_labelTrainIds.png' wins over '.png'."""
    if "fallback" not in spec:
        return {}
    fb = spec["fallback"]
    lut = np.full(fb["id_range"], IGNORE, dtype=np.int64)  # ids past the range are an error
    for k, v in fb["ids"].items():
        lut[k] = v
    return {spec["label_suffix"]: None, fb["suffix"]: dict(lut=lut, png16=fb.get("png16", False))}


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


def _list_items(name, root, split, with_labels=True):
    spec = DATASETS[name]
    if root is None or not os.path.isdir(root):
        raise UserError(f"--data-root {root} for dataset '{name}' is not a folder; expected "
                        f"{_expected_layout(name)}")
    fallback = spec["fallback"]["suffix"] if "fallback" in spec else None
    items = []
    for img_dir, label_dir, list_file in spec["splits"][split]:
        for sub in (img_dir, label_dir) if with_labels else (img_dir,):
            if not os.path.isdir(os.path.join(root, sub)):
                raise UserError(f"dataset '{name}': folder {os.path.join(root, sub)} not found; expected "
                                f"{_expected_layout(name)} (is --data-root the {spec['root_name']} folder?)")
        img_dir, label_dir = os.path.join(root, img_dir), os.path.join(root, label_dir)
        images = _files_under(img_dir, spec["img_suffix"])
        labels = set(_files_under(label_dir, ".png")) if with_labels else set()
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
            if not with_labels:
                items.append((os.path.join(img_dir, s + spec["img_suffix"]), None))
                continue
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


def read_png16_first_channel(path):
    """(H, W) int64: the first channel of a 16-bit PNG (SYNTHIA's GT/LABELS: class id in R, instance id
    in G), exactly. The official converters read it with cv2 IMREAD_UNCHANGED and take channel -1 of BGR,
    i.e. R. pypng reads the header (and, if need be, the whole file: exact but slow in pure Python, about
    a second per 1280x760 label); PIL's C decoder does grey, RGB and RGBA files (see _png16_pil)."""
    try:
        reader = png.Reader(filename=path)
        reader.preamble()
        if reader.bitdepth != 16:
            kind = "palette" if reader.colormap else f"{reader.planes}-channel"
            raise UserError(f"label {path} is a {reader.bitdepth}-bit {kind} PNG; expected a 16-bit PNG with "
                            "the SYNTHIA class id in its first (R) channel, as SYNTHIA's GT/LABELS (or the "
                            "converted *_labelTrainIds.png beside it)")
        fast = _png16_pil(path)
        if fast is not None:
            return fast
        w, h, rows, info = png.Reader(filename=path).read()
        raw = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, info["planes"])
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"label {path} not found") from None
    except Exception as e:  # png.FormatError / ChunkError / ProtocolError, PIL's OSError
        raise UserError(f"label {path} is not a readable PNG ({type(e).__name__}: {e})") from None
    return raw[..., 0].astype(np.int64)


def _png16_pil(path):
    """First channel of a 16-bit grey / RGB / RGBA PNG through PIL, or None for other kinds. PIL keeps 16-bit
    grey whole (mode I;16) but reduces colour to 8 bits by keeping each big-endian sample's high byte
    (raw mode 'RGB;16B'); decoding the file a second time with the samples taken as little-endian
    ('RGB;16L': the other byte) gives the low bytes. Tested against pypng on files with every row filter."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B") and im.tile and im.tile[0].args == "I;16B":
            return np.asarray(im).astype(np.int64)
        if im.mode not in ("RGB", "RGBA") or len(im.tile) != 1 or im.tile[0].args != im.mode + ";16B":
            return None
        high = np.asarray(im)[..., 0]
    with Image.open(path) as im:
        im.tile = [im.tile[0]._replace(args=im.mode + ";16L")]
        low = np.asarray(im)[..., 0]
    return high.astype(np.int64) * 256 + low


def read_label(path, num_classes, reduce_zero_label, ignore_index=255, label_map=None, png16=False):
    """Class indices of a label PNG, (H, W) uint8 (int64 if num_classes > 255): the raw values of a
    greyscale PNG or the palette indices of a 'P' PNG (``png16``: the first channel of a 16-bit PNG).
    ``label_map`` (a lookup table) maps raw ids to classes first (ids past its end are an error); then
    reduce_zero_label: 0 -> 255, k -> k-1. Every value must end in [0, num_classes) or be ``ignore_index``."""
    if png16:
        raw = read_png16_first_channel(path)
    else:
        raw = _read_index_png(path)
    return _to_classes(raw, path, num_classes, reduce_zero_label, ignore_index, label_map)


def _read_index_png(path):
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
    return raw.astype(np.int64)


def _to_classes(raw, path, num_classes, reduce_zero_label, ignore_index, label_map):
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



def _split_key(key):
    """dataset[i] or dataset[(i, sample_seed)] (common.dist.InfiniteSampler) -> (i, numpy Generator)."""
    if isinstance(key, (tuple, list)):
        index, seed = int(key[0]), int(key[1])
        return index, np.random.default_rng(seed)
    return int(key), np.random.default_rng()


# ----------------------------------------------------------------------------------------------------
# datasets

class SegDataset(torch.utils.data.Dataset):
    """(image, label or None) files -> dict(img (3, H, W) float, label (H, W) long, name, ori_size (H0, W0),
    meta): ``meta`` is the transform's geometry (see TrainTransform); a None label is all 255."""

    def __init__(self, items, num_classes, reduce_zero_label, transform=None, name="custom", label_maps=None):
        self.items, self.num_classes, self.reduce_zero_label = list(items), num_classes, reduce_zero_label
        self.transform, self.name = transform, name
        self.label_maps = label_maps or {}  # label suffix -> None or dict(lut, png16), see _label_maps

    def __len__(self):
        return len(self.items)

    def load(self, index):
        """The decoded (image uint8 RGB, label) pair before any transform."""
        img_path, label_path = self.items[index]
        img = imread(img_path)
        if label_path is None:  # with_labels=False: nothing to read, everything ignored
            return img, np.full(img.shape[:2], IGNORE, dtype=np.uint8)
        suffix = max((s for s in self.label_maps if label_path.endswith(s)), key=len, default=None)
        rule = self.label_maps.get(suffix) or {}
        label = read_label(label_path, self.num_classes, self.reduce_zero_label, label_map=rule.get("lut"),
                           png16=rule.get("png16", False))
        if label.shape != img.shape[:2]:
            raise UserError(f"label {label_path} is {label.shape[0]}x{label.shape[1]} but its image {img_path} "
                            f"is {img.shape[0]}x{img.shape[1]}; expected the same size")
        return img, label

    def __getitem__(self, key):
        index, rng = _split_key(key)
        img, label = self.load(index)
        ori = img.shape[:2]
        x, y, meta = apply_transform(self.transform or TestTransform(scale=None), img, label, rng)
        name = os.path.splitext(os.path.basename(self.items[index][0]))[0]
        return dict(img=x, label=y, name=name, ori_size=tuple(ori), meta=meta)


def collate_eval(batch):
    """Test samples of different sizes: a dict of lists (img, label, name, ori_size, meta) instead of stacks."""
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
    1-4 objects per image (``objects=(lo, hi)``) at random places, sizes and angles (later ones occlude
    earlier ones); the first object of sample i is class 1 + i % (K-1), so every class shows up in any
    K-1 consecutive samples.
    Samples go through ``transform`` like SegDataset's; ``key`` may be (index, sample_seed).

    ``domain="target"`` is a shifted domain for source-free adaptation: the same classes, shapes,
    textures and layout statistics (other draws: sample i is not the source's sample i), seen through
    another camera: colours rotated about the grey axis, lower contrast, a blur that softens the
    textures, stronger noise (see ``TARGET_SHIFT``). A model trained on the source alone loses 30-70 mIoU
    points on it, most of it objects taken for background, and batch-norm statistics of target batches
    win back a part (bench/synthetic_domain_gap.py). ``with_labels=False`` gives all-255 labels."""

    CACHE_BYTES = 256 << 20

    def __init__(self, num_samples=64, num_classes=6, size=(128, 128), split="train", transform=None, seed=0,
                 domain="source", with_labels=True, objects=(1, 4)):
        if num_classes < 2:
            raise UserError(f"SyntheticSeg needs num_classes >= 2 (background + one shape), got {num_classes}")
        if split not in ("train", "val"):
            raise UserError(f"SyntheticSeg split {split!r}: expected 'train' or 'val'")
        if domain not in ("source", "target"):
            raise UserError(f"SyntheticSeg domain {domain!r}: expected 'source' or 'target'")
        self.num_samples, self.num_classes, self.size = num_samples, num_classes, _pair(size)
        self.split, self.transform, self.seed = split, transform, seed
        if not 1 <= objects[0] <= objects[1]:
            raise UserError(f"SyntheticSeg objects={objects}: expected (lo, hi) with 1 <= lo <= hi")
        self.domain, self.with_labels, self.objects = domain, with_labels, tuple(objects)
        # generate() keeps what it drew when the whole set fits in CACHE_BYTES
        self._cache = {} if num_samples * self.size[0] * self.size[1] * 4 <= self.CACHE_BYTES else None
        self.name, self.reduce_zero_label = "synthetic" if domain == "source" else "synthetic_target", False
        self.classes = ["background"] + [SHAPES[(k - 1) % len(SHAPES)] + (f" {(k - 1) // len(SHAPES) + 1}"
                                         if k > len(SHAPES) else "") for k in range(1, num_classes)]

    def __len__(self):
        return self.num_samples

    def generate(self, index):
        """(image uint8 (H, W, 3) RGB, label uint8 (H, W)) of sample ``index``, a pure function of the
        constructor's arguments and ``index``; kept in memory after the first call when the whole set fits
        in CACHE_BYTES (the drawing takes longer than a training step of the quick-start models)."""
        if self._cache is None:
            return self._draw(index)
        if index not in self._cache:
            self._cache[index] = self._draw(index)
        img, label = self._cache[index]
        return img.copy(), label.copy()

    def _draw(self, index):
        key = [self.seed, 0 if self.split == "train" else 1, index]
        rng = np.random.default_rng(key if self.domain == "source" else key + [1])
        H, W = self.size
        yy, xx = np.mgrid[0:H, 0:W].astype(float)
        # background: random colour, two smooth waves, noise
        base = rng.uniform(40, 215, size=3)
        wave = sum(np.sin(2 * math.pi * (fy * yy / H + fx * xx / W) + ph) for fy, fx, ph in
                   rng.uniform([-2, -2, 0], [2, 2, 2 * math.pi], size=(2, 3)))
        img = base + 18.0 * wave[..., None] * rng.uniform(0.5, 1.0, size=3)
        label = np.zeros((H, W), dtype=np.uint8)
        n_obj = int(rng.integers(self.objects[0], self.objects[1] + 1))
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
        if self.domain == "target":
            return _target_camera(img, rng), label
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
        if not self.with_labels:
            label = np.full(label.shape, IGNORE, dtype=np.uint8)
        x, y, meta = apply_transform(self.transform or TestTransform(scale=None), img, label, rng)
        return dict(img=x, label=y, name=f"{self.name}_{self.split}_{index:06d}", ori_size=self.size, meta=meta)


# the target camera of SyntheticSeg(domain="target"); per image, each value is jittered a little
# (a milder one, 28 deg / 0.78 / blur 0.8 / noise 12, left the source models 70-80 % of the way; on it the
# source-free methods' gains were within their seed-to-seed noise, see the README's ATP and Uni-UVPT sections)
TARGET_SHIFT = dict(hue_degrees=60.0, contrast=0.6, brightness=10.0, blur_sigma=1.0, noise=14.0)


def _hue_rotation(degrees):
    """(3, 3) RGB matrix rotating colours about the grey axis (1, 1, 1) by ``degrees`` (Rodrigues)."""
    a = math.radians(degrees)
    u = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return math.cos(a) * np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * np.outer(u, u)


def _gaussian_blur(img, sigma):
    """Separable Gaussian blur of (H, W, C) float, radius 3 sigma, borders replicated."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(w * pad[i:i + img.shape[0]] for i, w in enumerate(k))            # (H, W + 2r, C)
    return sum(w * rows[:, i:i + img.shape[1]] for i, w in enumerate(k))        # (H, W, C)


def _target_camera(img, rng):
    """The target domain's look of a clean (H, W, 3) float RGB image -> uint8."""
    s = TARGET_SHIFT
    j = rng.uniform(0.85, 1.15, size=4)  # per-image jitter of the camera
    img = img @ _hue_rotation(s["hue_degrees"] * j[0]).T
    img = (img - 128.0) * s["contrast"] * j[1] + 128.0 + s["brightness"] * j[2]
    img = _gaussian_blur(img, s["blur_sigma"] * j[3])
    img = img + rng.normal(0, s["noise"], size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
