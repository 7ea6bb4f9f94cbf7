"""Data for source-free domain adaptation (common/seg_data.py, common/metrics.py): GTA5, SYNTHIA and ACDC
read from tiny copies of their official layouts (the id tables written out again in tests/seg_layouts.py),
labels-free datasets, the crop / flip geometry every sample carries, SyntheticSeg's target domain, and the
SYNTHIA class subsets of mIoU."""
import hashlib
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.io import UserError
from common.metrics import SYNTHIA13, SYNTHIA16, SegMetric, subset_miou
from common.palettes import CLASSES
from common import seg_data
from common.seg_data import (DATASETS, MEAN, STD, SyntheticSeg, TestTransform, TrainTransform, build_dataset,
                             read_png16_first_channel, resize_bilinear, resize_nearest)

try:
    from seg_layouts import DA_SPLITS, MANIFEST, expected_label, png16_bytes, write_layout
except ImportError:  # tests/ imported as a package
    from tests.seg_layouts import DA_SPLITS, MANIFEST, expected_label, png16_bytes, write_layout


def _denorm(x):
    """(3, H, W) normalised tensor -> (H, W, 3) float RGB 0..255."""
    return (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).permute(1, 2, 0).numpy()


def _dataset_name(layout):
    return layout.replace("_raw", "").replace("_labelids", "")


# ----------------------------------------------------------------------------------------------------
# official layouts, mapped on the fly

@pytest.mark.parametrize("layout", ["gta5", "gta5_raw", "synthia", "synthia_raw", "acdc_fog", "acdc_night_labelids"])
def test_da_layouts_and_label_tables(tmp_path, layout):
    root = write_layout(layout, tmp_path, n_train=3, n_val=2, size=(16, 20))
    name = _dataset_name(layout)
    assert DATASETS[name]["num_classes"] == 19 and DATASETS[name]["palette"] == "cityscapes"
    for split in DA_SPLITS[layout]:
        ds = build_dataset(name, root, split, TestTransform(scale=None))
        written = MANIFEST[root][split]
        # exactly the written pairs, in order: converted labels preferred; GT/COLOR, Depth, labelColor,
        # invIds, train_ref and the other ACDC conditions are not picked up
        assert ds.items == [(i, l) for i, l, _ in written]
        converted = not layout.endswith(("_raw", "_labelids"))
        assert all(l.endswith("_labelTrainIds.png") == converted for _, l, _ in written)
        for k, (img_path, _, raw) in enumerate(written):
            s = ds[k]
            np.testing.assert_array_equal(s["label"].numpy(), expected_label(layout, raw))
            ref = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float64)
            np.testing.assert_allclose(_denorm(s["img"]), ref, atol=1e-3)
            assert s["name"] == os.path.splitext(os.path.basename(img_path))[0]
    # the special values were exercised: the first and last train ids, ignored ids
    lab = build_dataset(name, root, "train", None)[0]["label"]
    assert 255 in lab and 0 in lab and 18 in lab


def test_synthia_16bit_values_and_converted_files_preferred(tmp_path):
    root = write_layout("synthia_raw", tmp_path / "raw", n_train=2, size=(12, 16))
    _, lp, raw = MANIFEST[root]["train"][0]
    # ids past 8 bits are read whole: 259 (low byte 3 = road) and 1027 are no class -> 255
    assert raw[0, 5] == 259 and raw[0, 6] == 1027
    lab = build_dataset("synthia", root, "train", None)[0]["label"]
    assert lab[0, :7].tolist() == [0, 18, 9, 255, 255, 255, 255]  # road, bicycle (11), terrain (16), void 0, 22
    # a converted file beside the raw one wins, whatever it holds
    for layout, label_dir in (("gta5", "labels"), ("synthia", "GT/LABELS"), ("acdc_rain", "gt/rain/train")):
        r = write_layout(layout, tmp_path / layout, n_train=2, size=(12, 16))
        ip, lp, raw = MANIFEST[r]["train"][0]
        assert lp.endswith("_labelTrainIds.png") and os.path.dirname(lp).startswith(os.path.join(r, label_dir))
        Image.fromarray(np.full(raw.shape, 17, np.uint8)).save(lp)
        assert (build_dataset(_dataset_name(layout), r, "train", None)[0]["label"] == 17).all()


@pytest.mark.parametrize("path", ["pil", "pypng"])
def test_png16_reader_against_pil_and_hand_written_files(tmp_path, monkeypatch, path):
    if path == "pypng":  # the slow, pure-Python fallback
        monkeypatch.setattr(seg_data, "_png16_pil", lambda p: None)
    rng = np.random.default_rng(0)
    for channels in (1, 3, 4):
        arr = rng.integers(0, 65536, (11, 9, channels))  # 11 rows: every row filter twice
        arr[0, 0, 0] = 65535
        p = str(tmp_path / f"c{channels}.png")
        with open(p, "wb") as f:
            f.write(png16_bytes(arr))
        np.testing.assert_array_equal(read_png16_first_channel(p), arr[..., 0])
    # PIL writes 16-bit greyscale faithfully (mode I;16): the same values come back
    grey = rng.integers(0, 65536, (5, 6)).astype(np.uint16)
    p = str(tmp_path / "pil.png")
    Image.fromarray(grey).save(p)
    assert Image.open(p).mode.startswith("I;16")
    np.testing.assert_array_equal(read_png16_first_channel(p), grey)


def test_synthia_label_must_be_16bit(tmp_path):
    root = write_layout("synthia_raw", tmp_path, n_train=2, size=(12, 16))
    ds = build_dataset("synthia", root, "train", None)
    (_, lp0, raw), (_, lp1, _) = MANIFEST[root]["train"]
    Image.fromarray(np.zeros(raw.shape + (3,), np.uint8)).save(lp0)  # 8-bit RGB
    with pytest.raises(UserError) as e:
        ds[0]
    assert lp0 in str(e.value) and "8-bit" in str(e.value) and "16-bit" in str(e.value)
    Image.fromarray(raw.astype(np.uint8)).save(lp1)  # 8-bit grey
    with pytest.raises(UserError, match="8-bit 1-channel PNG; expected a 16-bit"):
        ds[1]
    im = Image.fromarray(raw.astype(np.uint8))
    im.putpalette([0, 0, 0] * 256)
    im.save(lp1)  # 8-bit palette
    with pytest.raises(UserError, match="8-bit palette PNG; expected a 16-bit"):
        ds[1]
    with open(lp1, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError) as e:
        ds[1]
    assert lp1 in str(e.value) and "not a readable PNG" in str(e.value)


def test_da_errors_name_the_missing_folder(tmp_path):
    gta = write_layout("gta5", tmp_path / "g", n_train=2, size=(12, 16))
    with pytest.raises(UserError) as e:
        build_dataset("gta5", gta, "val", None)
    assert "'val'" in str(e.value) and "'train'" in str(e.value)
    shutil.rmtree(os.path.join(gta, "labels"))
    with pytest.raises(UserError) as e:
        build_dataset("gta5", gta, "train", None)
    assert os.path.join(gta, "labels") in str(e.value) and "images, labels" in str(e.value)
    syn = write_layout("synthia", tmp_path / "s", n_train=2, size=(12, 16))
    shutil.rmtree(os.path.join(syn, "RGB"))
    with pytest.raises(UserError) as e:
        build_dataset("synthia", syn, "train", None)
    assert os.path.join(syn, "RGB") in str(e.value) and "GT/LABELS" in str(e.value)
    acdc = write_layout("acdc_snow", tmp_path / "a", n_train=2, n_val=1, size=(12, 16))
    shutil.rmtree(os.path.join(acdc, "gt", "snow", "val"))
    with pytest.raises(UserError) as e:
        build_dataset("acdc_snow", acdc, "val", None)
    assert os.path.join(acdc, "gt/snow/val") in str(e.value)
    with pytest.raises(UserError) as e:  # fog has one image (seg_layouts' stray file) and no gt
        build_dataset("acdc_fog", acdc, "train", None)
    assert os.path.join(acdc, "gt/fog/train") in str(e.value)
    assert len(build_dataset("acdc_fog", acdc, "train", None, with_labels=False)) == 1
    # a missing label file names itself and the converted / raw alternatives
    acdc = write_layout("acdc_snow", tmp_path / "b", n_train=2, n_val=1, size=(12, 16))
    ip, lp, _ = MANIFEST[acdc]["train"][1]
    os.remove(lp)
    os.remove(lp.replace("_labelTrainIds.png", "_labelIds.png"))
    with pytest.raises(UserError) as e:
        build_dataset("acdc_snow", acdc, "train", None)
    assert lp in str(e.value) and "_gt_labelIds.png" in str(e.value) and ip in str(e.value)


# ----------------------------------------------------------------------------------------------------
# without labels, and the geometry of every sample

@pytest.mark.parametrize("layout,label_dir", [("gta5", "labels"), ("synthia_raw", "GT"), ("acdc_night", "gt")])
def test_without_labels_no_label_file_is_needed(tmp_path, layout, label_dir):
    root = write_layout(layout, tmp_path, n_train=2, n_val=1, size=(12, 16))
    shutil.rmtree(os.path.join(root, label_dir))  # nothing to open: the loader cannot have read them
    name = _dataset_name(layout)
    ds = build_dataset(name, root, "train", TestTransform(scale=None), with_labels=False)
    assert ds.items == [(i, None) for i, _, _ in MANIFEST[root]["train"]]
    s = ds[1]
    assert s["label"].shape == (12, 18) and (s["label"] == 255).all() and s["label"].dtype == torch.long
    assert s["meta"] == dict(box=(0, 12, 0, 18), flip=False, size=(12, 18))
    tf = TrainTransform(scale=(32, 24), crop=(20, 20), ratio_range=(1.0, 1.5), photometric=False)
    s = build_dataset(name, root, "train", tf, with_labels=False)[(0, 4)]
    assert s["img"].shape == (3, 20, 20) and (s["label"] == 255).all()


def test_meta_reproduces_the_crop_and_flip(tmp_path):
    root = write_layout("gta5", tmp_path, n_train=2, size=(24, 32))
    ip, _, raw = MANIFEST[root]["train"][1]
    full_label = expected_label("gta5", raw)
    full_img = np.asarray(Image.open(ip).convert("RGB"))
    tf = TrainTransform(scale=(64, 32), crop=(24, 24), ratio_range=(0.5, 2.0), photometric=False)
    ds = build_dataset("gta5", root, "train", tf)
    seen_flip, seen_pad = set(), False
    for seed in range(12):
        s = ds[(1, seed)]
        y1, y2, x1, x2 = s["meta"]["box"]
        size, flip = s["meta"]["size"], s["meta"]["flip"]
        assert 0 <= y1 < y2 <= size[0] and 0 <= x1 < x2 <= size[1] and y2 - y1 <= 24 and x2 - x1 <= 24
        lab = resize_nearest(full_label, size)[y1:y2, x1:x2]
        img = resize_bilinear(full_img, size)[y1:y2, x1:x2]
        if flip:
            lab, img = lab[:, ::-1], img[:, ::-1]
        h, w = y2 - y1, x2 - x1
        np.testing.assert_array_equal(s["label"][:h, :w].numpy(), lab)
        np.testing.assert_allclose(_denorm(s["img"][:, :h, :w]), img, atol=1e-3)
        assert (s["label"][h:] == 255).all() and (s["label"][:, w:] == 255).all()  # padding
        seen_flip.add(flip)
        seen_pad |= (h, w) != (24, 24)
    assert seen_flip == {False, True} and seen_pad  # both flips and a padded crop were checked
    # the test transform: the whole resized image, no flip; 24x32 into (40, 16): factor 2/3, w 21.33 -> 21
    s = build_dataset("gta5", root, "train", TestTransform(scale=(40, 16)))[0]
    assert s["meta"] == dict(box=(0, 16, 0, 21), flip=False, size=(16, 21)) and s["img"].shape == (3, 16, 21)
    # the default collate keeps meta: per-field tensors over the batch
    batch = next(iter(torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, [(0, 1), (1, 2)]), batch_size=2)))
    metas = [ds[(0, 1)]["meta"], ds[(1, 2)]["meta"]]
    assert [tuple(int(v[b]) for v in batch["meta"]["box"]) for b in range(2)] == [m["box"] for m in metas]
    assert batch["meta"]["flip"].tolist() == [m["flip"] for m in metas]
    assert [tuple(int(v[b]) for v in batch["meta"]["size"]) for b in range(2)] == [m["size"] for m in metas]


# ----------------------------------------------------------------------------------------------------
# the synthetic domain pair

def test_synthetic_source_is_unchanged_and_target_is_shifted():
    # digests of SyntheticSeg before the target domain existed (main at efe0cde): the source stays bit-exact
    h = hashlib.sha1()
    for split in ("train", "val"):
        for seed in (0, 3):
            ds = SyntheticSeg(5, 6, size=(32, 40), split=split, seed=seed)
            for i in range(5):
                img, lab = ds.generate(i)
                h.update(img.tobytes())
                h.update(lab.tobytes())
    assert h.hexdigest() == "07e4d0e8cb077f6b22cfc52759f8dcc352094dbd"
    h = hashlib.sha1()
    ds = SyntheticSeg(6, 6, size=(32, 40), seed=0, transform=TrainTransform(scale=(80, 64), crop=(32, 32)))
    for i in range(6):
        s = ds[(i, 10 + i)]
        h.update(s["img"].numpy().tobytes())
        h.update(s["label"].numpy().tobytes())
    assert h.hexdigest() == "fde4c16562b5589515e6c66ccd6a3e92c05d4c06"

    n, size = 40, (40, 40)
    src = SyntheticSeg(n, 6, size=size, split="train")
    tgt = SyntheticSeg(n, 6, size=size, split="train", domain="target")
    a, b = tgt.generate(3), SyntheticSeg(n, 6, size=size, split="train", domain="target").generate(3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # deterministic per (seed, split, index)
    assert not np.array_equal(a[0], SyntheticSeg(n, 6, size=size, split="val", domain="target").generate(3)[0])
    assert not np.array_equal(a[1], src.generate(3)[1])  # other draws than the source's sample 3
    assert tgt[0]["name"] == "synthetic_target_train_000000"
    ls = np.stack([src.generate(i)[1] for i in range(n)])
    lt = np.stack([tgt.generate(i)[1] for i in range(n)])
    share_s = np.bincount(ls.ravel(), minlength=6) / ls.size
    share_t = np.bincount(lt.ravel(), minlength=6) / lt.size
    assert np.abs(share_s - share_t).max() < 0.04, (share_s, share_t)  # the same layout statistics
    assert set(np.unique(lt)) == set(range(6))
    # the look differs: lower contrast, colours moved (mean background colour per image over a set)
    xs = np.stack([src.generate(i)[0] for i in range(n)]).astype(float)
    xt = np.stack([tgt.generate(i)[0] for i in range(n)]).astype(float)
    assert xt.std(axis=(1, 2)).mean() < 0.8 * xs.std(axis=(1, 2)).mean()
    obj_s = xs[ls == 1].mean(0)
    obj_t = xt[lt == 1].mean(0)
    assert np.abs(obj_s - obj_t).max() > 20, (obj_s, obj_t)
    # without labels: all ignored, through build_dataset too
    u = build_dataset("synthetic", None, "train", None, num_samples=2, with_labels=False)
    assert (u[1]["label"] == 255).all() and u[1]["meta"]["box"] == (0, 128, 0, 128)
    with pytest.raises(UserError, match="domain"):
        SyntheticSeg(2, 6, domain="tgt")
    # objects=(lo, hi): scene-like images (atp_sfda.py's preset draws 3-5); the default (1, 4) is the
    # hashed generator above
    bg = {o: np.mean([(SyntheticSeg(n, 6, size=size, objects=o).generate(i)[1] == 0).mean() for i in range(n)])
          for o in ((1, 1), (1, 4), (3, 5))}
    assert bg[(1, 1)] > bg[(1, 4)] + 0.05 > bg[(3, 5)] + 0.1, bg
    for bad in ((0, 2), (4, 3)):
        with pytest.raises(UserError, match="objects"):
            SyntheticSeg(2, 6, objects=bad)
    # generate() keeps what it drew: a caller writing into the arrays it got does not change the sample
    ds = SyntheticSeg(3, 6, size=size, domain="target")
    img, label = ds.generate(1)
    want = (img.copy(), label.copy())
    img[:] = 0
    label[:] = 0
    again = ds.generate(1)
    assert (again[0] == want[0]).all() and (again[1] == want[1]).all() and want[0].any()


def test_synthetic_target_is_harder_but_learnable():
    """A net trained on the source alone loses most of its accuracy on the target (this small one takes
    every target pixel for background), and batch-norm statistics re-estimated on unlabelled target images
    find objects again: the gap is the camera, not lost information."""
    torch.manual_seed(0)
    K, S = 6, 40
    tf = TrainTransform(scale=(2 * S, S), crop=(S, S), ratio_range=(0.75, 1.5), cat_max_ratio=1.0, photometric=False)

    def stack(ds):
        items = [ds[(i, i)] for i in range(len(ds))]
        return torch.stack([s["img"] for s in items]), torch.stack([s["label"] for s in items])

    xs, ys = stack(SyntheticSeg(64, K, size=(S, S), split="train", transform=tf))
    xt, _ = stack(SyntheticSeg(32, K, size=(S, S), split="train", domain="target", with_labels=False))
    xsv, ysv = stack(SyntheticSeg(24, K, size=(S, S), split="val"))
    xtv, ytv = stack(SyntheticSeg(24, K, size=(S, S), split="val", domain="target"))

    def block(i, o, d):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    net = nn.Sequential(block(3, 24, 1), block(24, 24, 2), block(24, 24, 4), nn.Conv2d(24, K, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(xs), (8,), generator=g)
        loss = F.cross_entropy(net(xs[idx]), ys[idx], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def miou(x, y, pred=None):
        net.eval()
        m = SegMetric(K)
        with torch.no_grad():
            m.update(net(x).argmax(1) if pred is None else pred, y)
        return m.compute()["mIoU"]
    source, target = miou(xsv, ysv), miou(xtv, ytv)
    background_only = miou(None, ytv, torch.zeros_like(ytv))  # IoU_0 / K: what "chance" scores
    for m in net.modules():  # AdaBN: running statistics from target batches only
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(xt)
    adapted = miou(xtv, ytv)
    # measured: source 62.0, target 12.9, AdaBN 20.6, background only 12.9 (bench/synthetic_domain_gap.py
    # trains longer, see its table; the source models of atp_sfda.py / uni_uvpt.py score 20-50 on the target)
    assert source - target > 30 and adapted > target + 5 and adapted > background_only + 5, \
        (source, target, adapted, background_only)


# ----------------------------------------------------------------------------------------------------
# SYNTHIA class subsets of mIoU

def test_synthia_subsets_and_subset_miou_by_hand():
    names = CLASSES["cityscapes"]
    assert [names[c] for c in range(19) if c not in SYNTHIA16] == ["terrain", "truck", "train"]
    assert [names[c] for c in SYNTHIA16 if c not in SYNTHIA13] == ["wall", "fence", "pole"]
    assert SYNTHIA16 == sorted(SYNTHIA16) and len(SYNTHIA16) == 16 and len(SYNTHIA13) == 13
    # IoU_c = c + 10 %, terrain / truck / train 0 (in the labels, never predicted), bus (15) NaN (absent)
    iou = [c + 10.0 for c in range(19)]
    iou[9] = iou[14] = iou[16] = 0.0
    iou[15] = math.nan
    # 16: classes 0..8 -> 10..18 (sum 126), 10..13 -> 20..23 (86), 17, 18 -> 27, 28 (55); bus skipped:
    # 267 / 15 = 17.8
    assert math.isclose(subset_miou(iou, SYNTHIA16), 267 / 15)
    # 13: minus wall, fence, pole (13 + 14 + 15 = 42): 225 / 12 = 18.75
    assert math.isclose(subset_miou(iou, SYNTHIA13), 225 / 12)
    # the official shortcut 19 * mIoU19 / 16: mIoU19 is the nan-mean over 18 classes (267 / 18), so it
    # gives 19 * 267 / (18 * 16) = 17.615 instead of 17.8
    miou19 = torch.nanmean(torch.tensor(iou)).item()
    assert math.isclose(19 * miou19 / 16, 19 * 267 / 288, rel_tol=1e-6)
    assert abs(19 * miou19 / 16 - subset_miou(iou, SYNTHIA16)) > 0.15
    # with no NaN the two agree
    iou[15] = 25.0
    miou19 = torch.nanmean(torch.tensor(iou)).item()
    assert math.isclose(19 * miou19 / 16, subset_miou(iou, SYNTHIA16), rel_tol=1e-6)
    # straight from SegMetric: class 2 of 4 absent everywhere is NaN and skipped
    m = SegMetric(4)
    m.update(torch.tensor([0, 0, 1, 3]), torch.tensor([0, 0, 1, 1]))
    assert math.isclose(subset_miou(m.compute()["IoU"], [1, 2, 3]), (50 + 0) / 2)
