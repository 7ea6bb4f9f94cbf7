"""Tiny copies of the official dataset folder layouts, for tests of the real loading code.

    root = write_layout("ade20k", tmp_path)          # -> tmp_path/ADEChallengeData2016
    ds = build_dataset("ade20k", root, "train", tf)

Layouts follow mmsegmentation's dataset docs and converters (``docs/en/user_guides/2_dataset_prepare.md``,
``tools/dataset_converters/{voc_aug,coco_stuff10k,coco_stuff164k,pascal_context,cityscapes}.py``):
JPEG images (PNG for Cityscapes), labels as PNG of raw indices ('P' palette PNGs for VOC's
SegmentationClass, greyscale elsewhere), split files where the dataset has them, and a few files the
loader must ignore (unlisted VOC images, Cityscapes' *_gtFine_color.png / *_instanceIds.png / .json).

Names: the DATASETS keys of common.seg_data, plus "cityscapes_labelids" (a Cityscapes root holding only
the raw *_gtFine_labelIds.png, as before cityscapesScripts' createTrainIdLabelImgs has run), and for the
domain-adaptation sets (DAFormer's tools/convert_datasets/{gta,synthia}.py, ACDC's own archive):
- "gta5": images/*.png, labels/*.png ('P' PNGs of Cityscapes label ids, as downloaded) and the
  converter's labels/*_labelTrainIds.png beside them; "gta5_raw": without the converted files.
- "synthia": RGB/*.png, GT/LABELS/*.png (16-bit RGB PNGs written by hand here: class id in R, instance
  id in G, every PNG row filter in turn), GT/LABELS/*_labelTrainIds.png, and GT/COLOR/, Depth/ as in the
  archive; "synthia_raw": without the converted files.
- "acdc_<fog|night|rain|snow>": rgb_anon/<cond>/{train,val,train_ref}/<seq>/*_rgb_anon.png and
  gt/<cond>/{train,val}/<seq>/*_gt_{labelTrainIds,labelIds,labelColor,invIds}.png (train_ref: the
  reference images a loader must skip); "acdc_<cond>_labelids": without *_gt_labelTrainIds.png.
  ``DA_SPLITS[name]`` says which splits a layout has (GTA5 and SYNTHIA: "train" only).

The raw label values include the special ones of each convention (0 where reduce_zero_label ignores
it, the largest class, 255, unmapped Cityscapes ids). ``MANIFEST[root][split]`` lists what was written:
(image path, label path, raw label array) in the order the loader must return them.
"""
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

MANIFEST = {}

# name -> (root folder, raw label values to draw from, values every label holds in its first row)
_SPECS = {
    "voc": ("VOCdevkit/VOC2012", list(range(21)) + [255], [0, 20, 255]),
    "voc_aug": ("VOCdevkit/VOC2012", list(range(21)) + [255], [0, 20, 255]),
    "ade20k": ("ADEChallengeData2016", list(range(151)), [0, 1, 150]),
    "coco_stuff10k": ("coco_stuff10k", list(range(172)), [0, 1, 171]),
    "coco_stuff164k": ("coco_stuff164k", list(range(171)) + [255], [0, 170, 255]),
    "pascal_context59": ("VOCdevkit/VOC2010", list(range(60)), [0, 1, 59]),
    "cityscapes": ("cityscapes", list(range(19)) + [255], [0, 18, 255]),
    "cityscapes_labelids": ("cityscapes", list(range(34)), [0, 7, 33, 4]),
    # GTA5 palette indices: Cityscapes ids 0..33, and values no class uses (34, 200, 255) -> ignored
    "gta5": ("gta5", list(range(35)) + [200, 255], [7, 33, 34, 255, 0]),
    "gta5_raw": ("gta5", list(range(35)) + [200, 255], [7, 33, 34, 255, 0]),
    # SYNTHIA class ids 0..22 and 16-bit values whose low byte is a class id (259 = 256 + road 3)
    "synthia": ("RAND_CITYSCAPES", list(range(23)) + [259, 1027], [3, 11, 16, 0, 22, 259, 1027]),
    "synthia_raw": ("RAND_CITYSCAPES", list(range(23)) + [259, 1027], [3, 11, 16, 0, 22, 259, 1027]),
    **{f"acdc_{c}{raw}": ("ACDC", list(range(34)), [0, 7, 33, 4])
       for c in ("fog", "night", "rain", "snow") for raw in ("", "_labelids")},
}
DA_SPLITS = {n: (("train",) if n.startswith(("gta5", "synthia")) else ("train", "val"))
             for n in _SPECS if n.startswith(("gta5", "synthia", "acdc"))}

# the cityscapesScripts table, written out again here so that the test does not read it from the code
# under test: trainId -> the labelId it comes from
_TRAINID_TO_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
# the same for SYNTHIA (DAFormer's synthia.py, written out by train id): trainId -> SYNTHIA class id
_TRAINID_TO_SYNTHIA = [3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11]


def png16_bytes(arr):
    """A 16-bit PNG of (H, W, C) integers (C = 1 grey, 3 RGB, 4 RGBA) built by hand (PIL cannot write
    16-bit colour): big-endian samples, row filters None, Sub, Up, Average, Paeth in turn, zlib."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    rows = arr.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int32)   # (H, 2 W C) bytes
    bpp = 2 * c
    out, prev = [], np.zeros(rows.shape[1], np.int32)
    for y in range(h):
        x, ftype = rows[y], y % 5
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])        # left
        cc = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])    # upper left
        if ftype == 0:
            pred = np.zeros_like(x)
        elif ftype == 1:
            pred = a
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (a + prev) // 2
        else:  # Paeth
            p = a + prev - cc
            pa, pb, pc = np.abs(p - a), np.abs(p - prev), np.abs(p - cc)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prev, cc))
        out.append(bytes([ftype]) + ((x - pred) % 256).astype(np.uint8).tobytes())
        prev = x

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(out)))
            + chunk(b"IEND", b""))


def _save_png16(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png16_bytes(arr))


def voc_palette_bytes():
    """The VOC palette as PIL wants it (768 bytes), built bit by bit like the VOC devkit's labelcolormap."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _label(rng, values, first_row, h, w):
    """Blocks of 4x4 pixels with values drawn from ``values``; the first row starts with ``first_row``."""
    blocks = rng.choice(values, size=((h + 3) // 4, (w + 3) // 4))
    lab = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint16 if max(values) > 255 else np.uint8)
    lab[0, :len(first_row)] = first_row
    return lab


def _image(rng, h, w):
    # smooth content (JPEG keeps it recognisable) plus a little noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, size=3)
    img = base + 40 * np.sin(xx[..., None] / 5.0 + rng.uniform(0, 6, size=3)) + rng.normal(0, 5, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_png(path, arr, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)  # an 'L' image becomes 'P' with its values as palette indices
        assert im.mode == "P" and np.array_equal(np.array(im), arr)
    im.save(path)


def _save_jpg(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def _touch_list(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(n + "\n" for n in names)


def write_layout(name, root, n_train=3, n_val=2, size=(48, 64), seed=0):
    """Writes a tiny copy of dataset ``name``'s official layout under ``root``; returns the dataset root
    to give build_dataset. Image i of a split is size[0] x (size[1] + 2 i), so sizes differ."""
    if name not in _SPECS:
        raise ValueError(f"no layout for {name!r}; known: {', '.join(_SPECS)}")
    folder, values, first = _SPECS[name]
    droot = os.path.join(os.fspath(root), folder)
    rng = np.random.default_rng(seed)
    h0, w0 = size
    manifest = {"train": [], "val": []}

    def pair(split, i):
        h, w = h0, w0 + 2 * i
        return _image(rng, h, w), _label(rng, values, first, h, w)

    if name in ("voc", "voc_aug", "pascal_context59"):
        year = "2007" if name != "pascal_context59" else "2008"
        label_dir = "SegmentationClass" if name != "pascal_context59" else "SegmentationClassContext"
        sets = "ImageSets/Segmentation" if name != "pascal_context59" else "ImageSets/SegmentationContext"
        palette = voc_palette_bytes() if name != "pascal_context59" else None
        parts = [("train", [f"{year}_{32 + i:06d}" for i in range(n_train)], label_dir, "train.txt"),
                 ("val", [f"{year}_{1000 + i:06d}" for i in range(n_val)], label_dir, "val.txt")]
        if name == "voc_aug":  # SBD images converted to greyscale PNGs, listed in aug.txt (no 255 in SBD)
            parts.append(("train", [f"2008_{5000 + i:06d}" for i in range(n_train)], "SegmentationClassAug",
                          "aug.txt"))
        for split, names, ldir, list_name in parts:
            for i, n in enumerate(names):
                img, lab = pair(split, i)
                if ldir == "SegmentationClassAug":
                    lab[lab == 255] = 0
                ip, lp = os.path.join(droot, "JPEGImages", n + ".jpg"), os.path.join(droot, ldir, n + ".png")
                _save_jpg(ip, img)
                _save_png(lp, lab, palette if ldir == "SegmentationClass" else None)
                manifest[split].append((ip, lp, lab))
            _touch_list(os.path.join(droot, sets, list_name), names)
        # VOC's JPEGImages holds far more images than the segmentation lists: they must be skipped
        _save_jpg(os.path.join(droot, "JPEGImages", f"{year}_999999.jpg"), _image(rng, h0, w0))
    elif name in ("ade20k", "coco_stuff10k", "coco_stuff164k"):
        dirs, suffix = {
            "ade20k": ({"train": "training", "val": "validation"}, ".png"),
            "coco_stuff10k": ({"train": "train2014", "val": "test2014"}, "_labelTrainIds.png"),
            "coco_stuff164k": ({"train": "train2017", "val": "val2017"}, "_labelTrainIds.png"),
        }[name]
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                stem = {"ade20k": f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}",
                        "coco_stuff10k": f"COCO_train2014_{100 + i:012d}",
                        "coco_stuff164k": f"{200 + i:012d}"}[name]
                img, lab = pair(split, i)
                ip = os.path.join(droot, "images", dirs[split], stem + ".jpg")
                lp = os.path.join(droot, "annotations", dirs[split], stem + suffix)
                _save_jpg(ip, img)
                _save_png(lp, lab)
                manifest[split].append((ip, lp, lab))
        if name == "ade20k":  # the real archive has no stray files, but a loader must not trip on one
            with open(os.path.join(droot, "images", "training", "README.txt"), "w") as f:
                f.write("not an image\n")
    elif name.startswith("gta5"):
        for i in range(n_train):
            img, ids = pair("train", i)
            stem = f"{i + 1:05d}"
            ip, lp = os.path.join(droot, "images", stem + ".png"), os.path.join(droot, "labels", stem + ".png")
            _save_png(ip, img)
            _save_png(lp, ids, voc_palette_bytes())  # a 'P' PNG as downloaded: palette indices are the ids
            if name == "gta5":
                lp = os.path.join(droot, "labels", stem + "_labelTrainIds.png")
                _save_png(lp, expected_label(name, ids).astype(np.uint8))
            manifest["train"].append((ip, lp, ids))
    elif name.startswith("synthia"):
        for i in range(n_train):
            img, ids = pair("train", i)
            stem = f"{i:07d}"
            ip = os.path.join(droot, "RGB", stem + ".png")
            lp = os.path.join(droot, "GT", "LABELS", stem + ".png")
            _save_png(ip, img)
            inst = rng.integers(0, 3000, ids.shape)  # instance ids in G, past 8 bits
            planes = [ids, inst, np.zeros_like(inst)] + ([np.full_like(inst, 65535)] if i % 2 else [])  # RGB / RGBA
            _save_png16(lp, np.stack(planes, axis=-1))
            if name == "synthia":
                lp = os.path.join(droot, "GT", "LABELS", stem + "_labelTrainIds.png")
                _save_png(lp, expected_label(name, ids).astype(np.uint8))
            _save_png(os.path.join(droot, "GT", "COLOR", stem + ".png"), np.zeros(ids.shape + (3,), np.uint8))
            _save_png16(os.path.join(droot, "Depth", stem + ".png"), inst)
            manifest["train"].append((ip, lp, ids))
    elif name.startswith("acdc"):
        cond = name.split("_")[1]
        seqs = {"train": ["GOPR0475", "GP010475"], "val": ["GOPR0476"]}
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                seq = seqs[split][i % len(seqs[split])]
                stem = f"{seq}_frame_{100 + i:06d}"
                img, ids = pair(split, i)
                ip = os.path.join(droot, "rgb_anon", cond, split, seq, stem + "_rgb_anon.png")
                gt = os.path.join(droot, "gt", cond, split, seq, stem + "_gt_")
                _save_png(ip, img)
                _save_png(gt + "labelIds.png", ids)
                lp = gt + "labelIds.png"
                if not name.endswith("_labelids"):
                    lp = gt + "labelTrainIds.png"
                    _save_png(lp, expected_label(name, ids).astype(np.uint8))
                _save_png(gt + "labelColor.png", np.zeros(ids.shape + (3,), np.uint8))
                _save_png(gt + "invIds.png", ids)
                manifest[split].append((ip, lp, ids))
        # what else the archive holds: reference images of the same places, other conditions
        _save_png(os.path.join(droot, "rgb_anon", cond, "train_ref", "GOPR0475", "GOPR0475_frame_000100_ref_anon.png"),
                  _image(rng, h0, w0))
        other = "snow" if cond != "snow" else "fog"
        _save_png(os.path.join(droot, "rgb_anon", other, "train", "GOPR0999", "GOPR0999_frame_000001_rgb_anon.png"),
                  _image(rng, h0, w0))
        for split in manifest:
            manifest[split].sort(key=lambda t: t[0])
    else:  # cityscapes, cityscapes_labelids
        cities = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                city = cities[split][i % len(cities[split])]
                stem = f"{city}_{i:06d}_000019"
                img, lab = pair(split, i)
                ip = os.path.join(droot, "leftImg8bit", split, city, stem + "_leftImg8bit.png")
                gt = os.path.join(droot, "gtFine", split, city, stem + "_gtFine_")
                _save_png(ip, img)
                if name == "cityscapes":
                    ids = np.array([_TRAINID_TO_ID[t] if t < 19 else 0 for t in lab.ravel()],
                                   dtype=np.uint8).reshape(lab.shape)
                    _save_png(gt + "labelTrainIds.png", lab)
                    _save_png(gt + "labelIds.png", ids)
                    lp = gt + "labelTrainIds.png"
                else:
                    _save_png(gt + "labelIds.png", lab)
                    lp = gt + "labelIds.png"
                # what else gtFine holds: colour and instance images, polygons
                _save_png(gt + "color.png", np.zeros(lab.shape + (3,), dtype=np.uint8))
                _save_png(gt + "instanceIds.png", lab)
                with open(gt + "polygons.json", "w") as f:
                    json.dump({"imgHeight": lab.shape[0], "imgWidth": lab.shape[1], "objects": []}, f)
                manifest[split].append((ip, lp, lab))
        for split in manifest:  # the loader lists files sorted by their path under the split folder
            manifest[split].sort(key=lambda t: t[0])
    MANIFEST[droot] = manifest
    return droot


def expected_label(name, raw):
    """What the loader must return for a raw label of layout ``name``, computed pixel by pixel from the
    conventions (not with the loader's lookup tables)."""
    out = np.empty(raw.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(raw):
        v = int(v)
        if name in ("ade20k", "coco_stuff10k", "pascal_context59"):  # reduce_zero_label
            out[idx] = 255 if v in (0, 255) else v - 1
        elif name == "cityscapes_labelids" or name.startswith(("gta5", "acdc")):
            out[idx] = _TRAINID_TO_ID.index(v) if v in _TRAINID_TO_ID else 255
        elif name.startswith("synthia"):
            out[idx] = _TRAINID_TO_SYNTHIA.index(v) if v in _TRAINID_TO_SYNTHIA else 255
        else:
            out[idx] = v
    return out
