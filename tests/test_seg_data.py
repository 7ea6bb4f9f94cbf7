"""common/seg_data.py and common/palettes.py: official layouts, mmseg-equivalent transforms, the synthetic
dataset, palettes. Expected values are hand computations (written out in the comments), PIL's own
resizing, or the conventions written out independently in tests/seg_layouts.py."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from common.dist import InfiniteSampler
from common.io import UserError
from common.palettes import CLASSES, PALETTES, get_palette, overlay, save_overlay
from common.seg_data import (DATASETS, MEAN, STD, SyntheticSeg, TestTransform, TrainTransform,
                             adjust_brightness, adjust_contrast, adjust_saturation, build_dataset,
                             collate_eval, imread, photometric_distortion, read_label, resize_bilinear,
                             resize_nearest, rgb_to_hsv_u8, shift_hue)

try:
    from seg_layouts import MANIFEST, expected_label, write_layout
except ImportError:  # tests/ imported as a package
    from tests.seg_layouts import MANIFEST, expected_label, write_layout

LAYOUTS = ["voc", "voc_aug", "ade20k", "coco_stuff10k", "coco_stuff164k", "pascal_context59", "cityscapes",
           "cityscapes_labelids"]


def _denorm(x):
    """(3, H, W) normalised tensor -> (H, W, 3) float RGB 0..255."""
    return (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------
# official layouts

@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_files_and_label_conventions(tmp_path, layout):
    root = write_layout(layout, tmp_path, n_train=3, n_val=2)
    name = "cityscapes" if layout.startswith("cityscapes") else layout
    for split in ("train", "val"):
        ds = build_dataset(name, root, split, TestTransform(scale=None))
        written = MANIFEST[root][split]
        # exactly the written pairs, in order (unlisted VOC images, README.txt, gtFine colour /
        # instance images are not picked up)
        assert ds.items == [(i, l) for i, l, _ in written]
        assert len(ds) == (6 if (layout == "voc_aug" and split == "train") else 3 if split == "train" else 2)
        assert ds.num_classes == DATASETS[name]["num_classes"]
        for k, (img_path, _, raw) in enumerate(written):
            s = ds[k]
            assert s["name"] == os.path.splitext(os.path.basename(img_path))[0]
            assert s["ori_size"] == raw.shape
            assert s["label"].dtype == torch.long
            np.testing.assert_array_equal(s["label"].numpy(), expected_label(layout, raw))
            ref = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float64)
            np.testing.assert_allclose(_denorm(s["img"]), ref, atol=1e-3)
    # the special values really were exercised: ignored zeros, the last class, 255
    lab = build_dataset(name, root, "train", None)[0]["label"]
    assert 255 in lab and lab[lab != 255].max() == DATASETS[name]["num_classes"] - 1


def test_num_samples_and_voc_palette_png(tmp_path):
    root = write_layout("voc", tmp_path)
    assert len(build_dataset("voc", root, "train", None, num_samples=2)) == 2
    # the VOC label is a palette PNG: its RGB colours are the VOC colour map, the loader gets indices
    _, lp, raw = MANIFEST[root]["train"][0]
    rgb = np.asarray(Image.open(lp).convert("RGB"))
    pal = get_palette("voc")
    np.testing.assert_array_equal(rgb[raw == 15], np.broadcast_to([192, 128, 128], rgb[raw == 15].shape))
    np.testing.assert_array_equal(rgb[raw < 21], pal[raw[raw < 21]])


# ----------------------------------------------------------------------------------------------------
# errors a user can cause

def test_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="not known"):
        build_dataset("ade", str(tmp_path), "train", None)
    # missing root: names the dataset and the expected sub-folders
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError) as e:
        build_dataset("ade20k", missing, "train", None)
    assert missing in str(e.value) and "ade20k" in str(e.value) and "images/training" in str(e.value)
    # a root without the sub-folders
    os.makedirs(tmp_path / "empty_root")
    with pytest.raises(UserError, match="annotations/validation|images/validation"):
        build_dataset("ade20k", str(tmp_path / "empty_root"), "val", None)

    voc = write_layout("voc", tmp_path / "v")
    split_file = os.path.join(voc, "ImageSets/Segmentation/val.txt")
    os.remove(split_file)
    with pytest.raises(UserError) as e:
        build_dataset("voc", voc, "val", None)
    assert split_file in str(e.value)
    # a listed image that does not exist
    with open(split_file, "w") as f:
        f.write("2007_424242\n")
    with pytest.raises(UserError, match="2007_424242.jpg"):
        build_dataset("voc", voc, "val", None)

    ade = write_layout("ade20k", tmp_path / "a")
    val_dir = os.path.join(ade, "images/validation")
    for f in os.listdir(val_dir):
        os.remove(os.path.join(val_dir, f))
    with pytest.raises(UserError) as e:
        build_dataset("ade20k", ade, "val", None)
    assert val_dir in str(e.value) and "no *.jpg" in str(e.value)
    # a missing label
    (img0, lab0, _), (img1, lab1, _), (img2, lab2, _) = MANIFEST[ade]["train"]
    os.rename(lab2, lab2 + ".bak")
    with pytest.raises(UserError) as e:
        build_dataset("ade20k", ade, "train", None)
    assert lab2 in str(e.value)
    os.rename(lab2 + ".bak", lab2)

    ds = build_dataset("ade20k", ade, "train", None)
    with open(img0, "wb") as f:  # a corrupt image
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(UserError) as e:
        ds[0]
    assert img0 in str(e.value)
    Image.fromarray(np.ones((10, 12), dtype=np.uint8)).save(lab1)  # a label of the wrong size
    with pytest.raises(UserError) as e:
        ds[1]
    assert lab1 in str(e.value) and img1 in str(e.value) and "10x12" in str(e.value)
    bad = np.ones((48, 68), dtype=np.uint8)
    bad[3, 5] = 151  # ADE has 150 classes: raw 151 is out of range even after reduce_zero_label
    Image.fromarray(bad).save(lab2)
    with pytest.raises(UserError) as e:
        ds[2]
    assert lab2 in str(e.value) and "151" in str(e.value)


def test_read_label_conventions(tmp_path):
    p = str(tmp_path / "l.png")
    Image.fromarray(np.array([[0, 1, 150, 255]], dtype=np.uint8)).save(p)
    np.testing.assert_array_equal(read_label(p, 150, True), [[255, 0, 149, 255]])
    np.testing.assert_array_equal(read_label(p, 151, False), [[0, 1, 150, 255]])
    with pytest.raises(UserError, match="150"):
        read_label(p, 150, False)  # 150 is not a class of 0..149
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(p)
    with pytest.raises(UserError, match="RGB"):
        read_label(p, 19, False)
    with pytest.raises(UserError, match="not found"):
        imread(str(tmp_path / "none.jpg"))
    # cityscapes: an id past the labelIds table
    cs = write_layout("cityscapes_labelids", tmp_path / "c")
    _, lp, raw = MANIFEST[cs]["train"][0]
    raw = raw.copy()
    raw[0, 0] = 40
    Image.fromarray(raw).save(lp)
    with pytest.raises(UserError) as e:
        build_dataset("cityscapes", cs, "train", None)[0]
    assert lp in str(e.value) and "40" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# geometry

def test_resize_sizes_by_hand():
    t = TrainTransform(scale=(2048, 512))
    # 500x375 (w x h), r = 1: factor min(2048/500, 512/375) = 1.36533 -> h 512, w 682.67 -> 683
    assert t.resize_size(375, 500, 1.0) == (512, 683)
    # r = 0.5: bound (1024, 256): factor min(2.048, 0.68267) -> h 256, w 341.33 -> 341
    assert t.resize_size(375, 500, 0.5) == (256, 341)
    # r = 2: bound (4096, 1024): factor 2.73067 -> h 1024, w 1365.33 -> 1365
    assert t.resize_size(375, 500, 2.0) == (1024, 1365)
    # r = 0.7: bound int(1433.6), int(358.4) = (1433, 358): factor 358/375 -> h 358, w 477.33 -> 477
    assert t.resize_size(375, 500, 0.7) == (358, 477)
    # Cityscapes 1024x2048 with (2048, 1024), r = 0.75: bound (1536, 768), factor 0.75
    assert TrainTransform(scale=(2048, 1024)).resize_size(1024, 2048, 0.75) == (768, 1536)
    # the same sizes come out of the transform: ratio fixed at 0.7, crop larger than the image
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (375, 500), dtype=np.uint8)
    tf = TrainTransform(scale=(2048, 512), crop=(400, 500), ratio_range=(0.7, 0.7), flip_prob=0, photometric=False)
    x, y = tf(img, label, np.random.default_rng(1))
    valid = (y != 255).nonzero()
    assert valid[:, 0].max() + 1 == 358 and valid[:, 1].max() + 1 == 477


def test_test_transform_sizes_by_hand():
    tt = TestTransform(scale=(2048, 512))
    assert tt.output_size(375, 500) == (512, 683)     # as above
    assert tt.output_size(512, 512) == (512, 512)     # factor 1
    assert tt.output_size(1024, 2048) == (512, 1024)  # factor min(1, 0.5)
    assert tt.output_size(300, 1000) == (512, 1707)   # factor min(2.048, 1.70667): w 1706.67 -> 1707
    assert tt.output_size(800, 200) == (2048, 512)    # factor 2.56 from both bounds
    td = TestTransform(scale=(2048, 512), size_divisor=32)
    assert td.output_size(375, 500) == (512, 704)     # 683 rounded up to 22 * 32
    assert td.output_size(300, 1000) == (512, 1728)
    assert TestTransform(scale=None, size_divisor=32).output_size(33, 64) == (64, 64)
    # mmcv rounds half up, int(x * f + 0.5): 25 * 0.5 = 12.5 -> 13 (Python's round would give 12)
    assert TestTransform(scale=(50, 50)).output_size(100, 25) == (50, 13)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (375, 500), dtype=np.uint8)
    for t, size in ((tt, (512, 683)), (td, (512, 704))):
        x, y = t(img, label)
        assert tuple(x.shape) == (3,) + size
        assert y.dtype == torch.long and torch.equal(y, torch.from_numpy(label).long())  # original size
    # no resize needed: the image is only normalised
    x, _ = TestTransform(scale=(500, 375))(img, label)
    np.testing.assert_allclose(_denorm(x), img, atol=1e-3)


def test_bilinear_matches_pil_when_upscaling_and_nearest_by_hand():
    # PIL's bilinear has no antialiasing effect when enlarging, so it is plain half-pixel bilinear
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    ours = resize_bilinear(img, (25, 31)).astype(int)
    pil = np.asarray(Image.fromarray(img).resize((31, 25), Image.BILINEAR)).astype(int)
    assert np.abs(ours - pil).max() <= 1
    # a window of the resized image is the same as cropping the whole resized image
    big = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    lab = rng.integers(0, 9, (37, 53), dtype=np.uint8)
    for size, box in (((80, 100), (10, 50, 33, 100)), ((20, 31), (5, 20, 0, 9)), ((37, 53), (1, 30, 2, 9))):
        np.testing.assert_array_equal(resize_bilinear(big, size, box),
                                      resize_bilinear(big, size)[box[0]:box[1], box[2]:box[3]])
        np.testing.assert_array_equal(resize_nearest(lab, size, box),
                                      resize_nearest(lab, size)[box[0]:box[1], box[2]:box[3]])
    # cv2 INTER_NEAREST: source index floor(i * src / dst); 4 -> 6: 0, .67, 1.33, 2, 2.67, 3.33
    row = np.array([[10, 11, 12, 13]])
    np.testing.assert_array_equal(resize_nearest(row, (1, 6)), [[10, 10, 11, 12, 12, 13]])
    row6 = np.array([[0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(resize_nearest(row6, (1, 4)), [[0, 1, 3, 4]])  # 0, 1.5, 3, 4.5
    np.testing.assert_array_equal(resize_nearest(row.T, (6, 1)), np.array([[10, 10, 11, 12, 12, 13]]).T)


# ----------------------------------------------------------------------------------------------------
# train transform

def test_train_transform_crop_pad_and_determinism():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (40, 60), dtype=np.uint8)
    # a bound equal to the image keeps its size; the 64x64 crop then needs padding
    tf = TrainTransform(scale=(60, 40), crop=(64, 64), ratio_range=(1, 1), flip_prob=0, photometric=False)
    x, y = tf(img, label, np.random.default_rng(3))
    assert tuple(x.shape) == (3, 64, 64) and tuple(y.shape) == (64, 64)
    assert (x[:, 40:] == 0).all() and (x[:, :, 60:] == 0).all()
    assert (y[40:] == 255).all() and (y[:, 60:] == 255).all()
    np.testing.assert_allclose(_denorm(x[:, :40, :60]), img, atol=1e-3)
    assert torch.equal(y[:40, :60], torch.from_numpy(label).long())

    full = TrainTransform(scale=(120, 80), crop=(64, 64))
    a = full(img, label, np.random.default_rng(7))
    b = full(img, label, np.random.default_rng(7))
    c = full(img, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert tuple(a[0].shape) == (3, 64, 64)


def test_flip_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    label = np.tile(np.arange(24, dtype=np.uint8) % 7, (16, 1))
    kw = dict(scale=(24, 16), crop=(16, 24), ratio_range=(1, 1), photometric=False)
    x, y = TrainTransform(flip_prob=1.0, **kw)(img, label, np.random.default_rng(0))
    np.testing.assert_allclose(_denorm(x), img[:, ::-1], atol=1e-3)
    np.testing.assert_array_equal(y.numpy(), label[:, ::-1])
    x, y = TrainTransform(flip_prob=0.0, **kw)(img, label, np.random.default_rng(0))
    np.testing.assert_allclose(_denorm(x), img, atol=1e-3)


def test_cat_max_ratio_finds_a_mixed_crop():
    # 200x200: columns 0..149 class 0, 150..199 class 1; a 100x100 crop at x has class-0 share
    # (150 - x) / 100 for x in [50, 100]: < 0.75 only for x > 75, i.e. 25 of the 101 offsets
    label = np.zeros((200, 200), dtype=np.uint8)
    label[:, 150:] = 1
    img = np.zeros((200, 200, 3), dtype=np.uint8)
    img[..., 0] = np.arange(200, dtype=np.uint8)[None, :]  # red channel = column: recovers the offset
    kw = dict(scale=(200, 200), crop=(100, 100), ratio_range=(1, 1), flip_prob=0, photometric=False)

    def good_share(cat):
        ok = 0
        for s in range(60):
            x, y = TrainTransform(cat_max_ratio=cat, **kw)(img, label, np.random.default_rng(s))
            x0 = int(round(_denorm(x)[0, 0, 0]))
            assert torch.equal(y, torch.from_numpy(label[:100, x0:x0 + 100]).long())  # a real crop
            share = (y == 0).float().mean().item()
            ok += share < 0.75 and (y == 1).any().item()
        return ok / 60

    # with the check, a crop fails only if 11 draws all miss (0.75^11 = 4 %); without it 25 % pass
    assert good_share(0.75) >= 0.85
    assert good_share(1.0) <= 0.45
    # a label with one class only: no crop can pass, the last one is kept
    x, y = TrainTransform(**kw)(img, np.zeros_like(label), np.random.default_rng(0))
    assert tuple(y.shape) == (100, 100) and (y == 0).all()


def test_photometric_steps_by_hand():
    const = np.full((2, 2, 3), 100, dtype=np.uint8)
    assert (adjust_brightness(const, 20.7) == 120).all()     # 120.7 truncated
    assert (adjust_brightness(const, -40.2) == 59).all()     # 59.8 truncated
    assert (adjust_contrast(const, 1.5) == 150).all()
    assert (adjust_contrast(np.full((1, 1, 3), 200, np.uint8), 1.5) == 255).all()  # clipped
    assert (adjust_contrast(np.full((1, 1, 3), 101, np.uint8), 0.5) == 50).all()   # 50.5 truncated
    # OpenCV uint8 HSV of (10, 200, 100): V = 200, S = 255 * 190 / 200 = 242.25 -> 242,
    # H = (60 * (2 + (b - r) / diff)) / 2 = 30 * (2 + 90 / 190) = 74.2 -> 74
    np.testing.assert_array_equal(rgb_to_hsv_u8(np.array([[[10, 200, 100]]], np.uint8)), [[[74, 242, 200]]])
    # (200, 50, 100): red is the max and g < b, so the hue is negative before wrapping:
    # 30 * (g - b) / diff = 30 * -50 / 150 = -10 -> 170; S = 255 * 150 / 200 = 191.25 -> 191
    np.testing.assert_array_equal(rgb_to_hsv_u8(np.array([[[200, 50, 100]]], np.uint8)), [[[170, 191, 200]]])
    red = np.array([[[255, 0, 0]]], np.uint8)
    # +18 units = +36 degrees: sector 0 at 0.6 -> (V, V * 0.6, 0) = (255, 153, 0)
    np.testing.assert_array_equal(shift_hue(red, 18), [[[255, 153, 0]]])
    # -18 units = 324 degrees: sector 5 at 0.4 -> (V, 0, V * (1 - 0.4)) = (255, 0, 153)
    np.testing.assert_array_equal(shift_hue(red, -18), [[[255, 0, 153]]])
    # saturation x0.5 of (200, 80, 80): S = 255 * 120 / 200 = 153 -> 76 (76.5 truncated);
    # the other channels become V * (1 - 76/255) = 140.4 -> 140
    sat = adjust_saturation(np.array([[[200, 80, 80]]], np.uint8), 0.5)
    np.testing.assert_array_equal(sat, [[[200, 140, 140]]])
    # grey has no hue or saturation to change
    grey = np.full((1, 1, 3), 77, np.uint8)
    assert (shift_hue(grey, 10) == 77).all() and (adjust_saturation(grey, 1.5) == 77).all()


class _Scripted:
    """A stand-in for numpy's Generator that returns scripted draws, in the order mmseg draws them."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, *args, **kwargs):
        return self.values.pop(0)

    uniform = integers


def test_photometric_contrast_second_or_last():
    # mmseg: brightness?, mode, [contrast? if mode 1], saturation?, hue?, [contrast? if mode 0].
    # Clipping makes the order visible on (200, 80, 80) with contrast x1.5 and saturation x0.5:
    px = np.array([[[200, 80, 80]]], np.uint8)
    # mode 1: contrast -> (255, 120, 120): S = 135 -> 67, others 255 - 67 = 188
    rng = _Scripted([0, 1, 1, 1.5, 1, 0.5, 0])
    np.testing.assert_array_equal(photometric_distortion(px, rng), [[[255, 188, 188]]])
    assert rng.values == []
    # mode 0: saturation -> (200, 140, 140) (see above), then contrast -> (255, 210, 210)
    rng = _Scripted([0, 0, 1, 0.5, 0, 1, 1.5])
    np.testing.assert_array_equal(photometric_distortion(px, rng), [[[255, 210, 210]]])
    assert rng.values == []
    # brightness first: +30 then contrast x1.5 (mode 1): 100 -> 130 -> 195
    rng = _Scripted([1, 30.0, 1, 1, 1.5, 0, 0])
    assert (photometric_distortion(np.full((1, 1, 3), 100, np.uint8), rng) == 195).all()


# ----------------------------------------------------------------------------------------------------
# synthetic data

def test_synthetic_is_deterministic_and_covers_the_classes():
    a = SyntheticSeg(12, 6, size=(32, 40), split="train")
    b = SyntheticSeg(12, 6, size=(32, 40), split="train")
    v = SyntheticSeg(12, 6, size=(32, 40), split="val")
    for i in range(3):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["img"], sb["img"]) and torch.equal(sa["label"], sb["label"])
        assert not torch.equal(sa["img"], v[i]["img"])
        assert tuple(sa["img"].shape) == (3, 32, 40) and sa["ori_size"] == (32, 40)
    labels = torch.stack([a[i]["label"] for i in range(12)])
    assert set(labels.unique().tolist()) == set(range(6))  # every class within K-1 samples
    assert a[0]["name"] == "synthetic_train_000000"
    np.testing.assert_array_equal(a.original_image(a[4]["name"]), a.generate(4)[0])
    # (index, seed) keys: the augmentation depends on the seed only
    tf = TrainTransform(scale=(80, 64), crop=(32, 32))
    t = SyntheticSeg(12, 6, size=(32, 40), transform=tf)
    assert torch.equal(t[(2, 5)]["img"], t[(2, 5)]["img"]) and not torch.equal(t[(2, 5)]["img"], t[(2, 6)]["img"])
    # through a DataLoader with common.dist.InfiniteSampler, twice: the same batches
    def first_batch():
        loader = torch.utils.data.DataLoader(t, batch_size=4, sampler=InfiniteSampler(len(t), seed=3))
        return next(iter(loader))
    x1, x2 = first_batch(), first_batch()
    assert torch.equal(x1["img"], x2["img"]) and torch.equal(x1["label"], x2["label"])


def test_synthetic_is_learnable_and_colour_is_not_enough():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two that compete
    try:
        _learnability()
    finally:
        torch.set_num_threads(threads)


def _learnability():
    torch.manual_seed(0)
    K = 6
    tr = SyntheticSeg(48, K, size=(48, 48), split="train")
    va = SyntheticSeg(16, K, size=(48, 48), split="val")
    X, Y = torch.stack([tr[i]["img"] for i in range(48)]), torch.stack([tr[i]["label"] for i in range(48)])
    Xv, Yv = torch.stack([va[i]["img"] for i in range(16)]), torch.stack([va[i]["label"] for i in range(16)])
    majority = (Yv == 0).float().mean().item()

    # per-pixel nearest class-mean colour: classes share colours in pairs, so it cannot be perfect
    means = torch.stack([X.permute(0, 2, 3, 1)[Y == k].mean(0) for k in range(K)])  # (K, 3)
    colour_pred = torch.cdist(Xv.permute(0, 2, 3, 1).reshape(-1, 3), means).argmin(1).view(Yv.shape)
    colour_acc = (colour_pred == Yv).float().mean().item()
    assert colour_acc < 0.9

    def block(i, o, d):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=d, dilation=d), nn.BatchNorm2d(o), nn.ReLU())
    net = nn.Sequential(block(3, 24, 1), block(24, 24, 2), block(24, 24, 4), nn.Conv2d(24, K, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, 48, (8,), generator=g)
        loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(Xv).argmax(1) == Yv).float().mean().item()
    # measured: acc 0.95, majority 0.81, colour-only 0.68
    assert acc > majority + 0.08 and acc > colour_acc + 0.15, (acc, majority, colour_acc)


def test_build_dataset_synthetic_and_collate():
    ds = build_dataset("synthetic", None, "val", TestTransform(scale=None), num_samples=3)
    assert len(ds) == 3 and ds.num_classes == DATASETS["synthetic"]["num_classes"]
    small = SyntheticSeg(2, 4, size=(16, 20), split="val")
    batch = collate_eval([ds[0], small[1]])
    assert [tuple(x.shape) for x in batch["img"]] == [(3, 128, 128), (3, 16, 20)]
    assert batch["name"] == ["synthetic_val_000000", "synthetic_val_000001"]
    assert batch["ori_size"] == [(128, 128), (16, 20)]


# ----------------------------------------------------------------------------------------------------
# palettes

def test_palettes_fit_the_datasets():
    for name, spec in DATASETS.items():
        if name == "synthetic":
            continue
        pal = get_palette(spec["palette"])
        assert pal.shape == (spec["num_classes"], 3) and pal.dtype == np.uint8, name
        assert len(CLASSES[spec["palette"]]) == spec["num_classes"], name
        assert get_palette(name).shape == pal.shape  # dataset names work too
    assert CLASSES["ade20k"][0] == "wall" and CLASSES["ade20k"][-1] == "flag"
    assert CLASSES["cityscapes"][11] == "person" and CLASSES["voc"][15] == "person"
    assert CLASSES["coco_stuff"][80] == "banner" and CLASSES["pascal_context"][36] == "person"
    # well-known entries: VOC person (192, 128, 128), tvmonitor (0, 64, 128); Cityscapes road, car
    assert PALETTES["voc"][15] == (192, 128, 128) and PALETTES["voc"][20] == (0, 64, 128)
    assert PALETTES["cityscapes"][0] == (128, 64, 128) and PALETTES["cityscapes"][13] == (0, 0, 142)
    assert PALETTES["ade20k"][0] == (120, 120, 120)
    # extended / unknown: deterministic, of the asked length, known colours kept
    ext = get_palette("cityscapes", 25)
    assert ext.shape == (25, 3) and (ext[:19] == get_palette("cityscapes")).all()
    assert (get_palette("whatever", 30) == get_palette("whatever", 30)).all()
    assert len({tuple(c) for c in get_palette("whatever", 300)}) == 300


def test_overlay_formula(tmp_path):
    img = np.array([[[255, 0, 0], [0, 0, 0]], [[100, 100, 100], [10, 20, 30]]], dtype=np.uint8)
    pred = np.array([[0, 1], [255, 2]])
    pal = [(0, 0, 0), (255, 255, 255), (0, 0, 255)]
    out = overlay(img, pred, pal, opacity=0.5)
    # img * 0.5 + colour * 0.5, truncated: 127.5 -> 127; 15 + 127.5 = 142.5 -> 142; 255 unchanged
    expected = np.array([[[127, 0, 0], [127, 127, 127]], [[100, 100, 100], [5, 10, 142]]], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(overlay(img, pred, pal, opacity=0.0), img)
    path = str(tmp_path / "vis" / "o.png")
    save_overlay(path, img, pred, pal)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
