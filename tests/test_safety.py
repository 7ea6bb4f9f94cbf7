"""The generic hardening in common/: the restricted checkpoint loader (official mmengine / V-PETL files load,
malicious pickles never run), the payload SHA-256, RunBook's run-dir guards (lock, leftovers, log cut,
flag comparison, finished runs), the data check, 16-bit images, the comparison pictures and mmengine's
LinearLR -> PolyLR schedule against a hand-written sequence."""
import argparse
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from common.dist import DistInfo
from common.io import RunFinished, Skipped, UserError, load_checkpoint, state_dict_of
from common.palettes import colourize, comparison, get_palette
from common.seg_data import build_dataset, check_files, imread
from common.train import RunBook, save_state, warmup_poly
from tests.seg_layouts import write_layout

# ----------------------------------------------------------------------------------------------------
# the loader


def _fake_module(name, cls):
    """Registers ``cls`` as ``name.<cls>`` so that torch.save can pickle it; returns the cleanup."""
    parts = name.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        mod = ".".join(parts[:i])
        if mod not in sys.modules:
            sys.modules[mod] = types.ModuleType(mod)
            added.append(mod)
    cls.__module__ = name
    setattr(sys.modules[name], cls.__name__, cls)
    return lambda: [sys.modules.pop(m) for m in added]


class HistoryBuffer:  # what mmengine stores in a checkpoint's message_hub
    def __init__(self):
        self._log_history, self._count_history, self.max_length = np.array([0.5, 0.25]), np.array([1, 1]), 1000000

    def __setstate__(self, state):
        raise AssertionError("the real HistoryBuffer.__setstate__ ran")


def test_mmengine_and_vpetl_checkpoints_load_inertly(tmp_path, capsys):
    cleanup = _fake_module("mmengine.logging.history_buffer", HistoryBuffer)
    path = tmp_path / "iter_20000.pth"
    weights = {"backbone.patch_embed.projection.weight": torch.randn(4, 3, 4, 4)}
    torch.save({"meta": {"iter": 20000, "seed": np.int64(7), "dataset_meta": {"classes": ("a", "b")}},
                "state_dict": weights, "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}},
                "args": argparse.Namespace(lr=6.25e-3, epochs=70)}, path)
    cleanup()  # the loader never needs (nor imports) the class
    ck = load_checkpoint(path, "--mid-checkpoint")
    assert torch.equal(ck["state_dict"]["backbone.patch_embed.projection.weight"],
                       weights["backbone.patch_embed.projection.weight"])
    assert ck["meta"]["iter"] == 20000 and ck["meta"]["seed"] == 7 and ck["meta"]["dataset_meta"]["classes"] == ("a", "b")
    buf = ck["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, Skipped) and buf.cls == "mmengine.logging.history_buffer.HistoryBuffer"
    assert np.array_equal(buf.state["_log_history"], [0.5, 0.25]) and buf.state["max_length"] == 1000000
    assert isinstance(ck["args"], Skipped) and ck["args"].state == {"lr": 6.25e-3, "epochs": 70}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HistoryBuffer" in err[0] and "argparse.Namespace" in err[0]


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def malicious_payloads(marker):
    """Pickled objects whose __reduce__ would create ``marker`` if the file were unpickled normally."""
    import builtins
    return {"os.system": _Payload(os.system, f"touch {marker}"),
            "exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
            "pathlib.touch": _Payload(type(marker).touch, marker)}


@pytest.mark.parametrize("kind", ["os.system", "exec", "subprocess.Popen", "pathlib.touch"])
def test_malicious_pickle_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": malicious_payloads(marker)[kind]}, path)
    with pytest.raises(UserError, match="refused") as e:
        load_checkpoint(path, "--pretrained")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_legacy_format_numpy_and_torch_types(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3)}, p, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(p)["w"], torch.arange(3))
    p = tmp_path / "misc.pth"
    obj = {"p": torch.nn.Parameter(torch.ones(2)), "bf": torch.ones(2, dtype=torch.bfloat16), "s": {1, 2},
           "b": b"\x00\xff", "dev": torch.device("cpu"), "dt": torch.float16, "np": np.arange(4.0).reshape(2, 2)}
    torch.save(obj, p)
    got = load_checkpoint(p)
    assert isinstance(got["p"], torch.nn.Parameter) and got["bf"].dtype == torch.bfloat16
    assert got["s"] == {1, 2} and got["b"] == b"\x00\xff" and got["dt"] == torch.float16
    assert np.array_equal(got["np"], obj["np"])


def test_damaged_files_and_wrong_contents(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_checkpoint(tmp_path / "cut.pt")
    for obj, what in ((torch.ones(3), "a single tensor"), ([torch.ones(1)], "a list"), ({"epoch": 3}, "a dict")):
        with pytest.raises(UserError, match=what):
            state_dict_of(obj, "--checkpoint x.pt")


def test_payload_sha256_catches_flipped_bytes(tmp_path):
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.copy_(torch.arange(64 * 64, dtype=torch.float32).view(64, 64))
    save_state(str(tmp_path), "last.pt", model, None, 5, {"lr": 0.1})
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 5
    data = bytearray((tmp_path / "last.pt").read_bytes())
    at = bytes(data).index(np.float32(1234.0).tobytes())  # inside the weight's storage record
    data[at] ^= 0x01
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "flipped.pt")


# ----------------------------------------------------------------------------------------------------
# RunBook


def book_args(work_dir, **kw):
    base = dict(work_dir=str(work_dir), resume=False, iters=10, lr=0.1, dataset="synthetic", workers=2)
    return argparse.Namespace(**{**base, **kw})


def one_run(work_dir, steps=4, **kw):
    """A RunBook run of ``steps`` iterations of a linear model, last.pt at every step, logged."""
    book = RunBook(book_args(work_dir, **kw), DistInfo())
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    book.resume(model, opt)
    for it in range(book.start, steps):
        book.log(iter=it + 1, loss=1.0 / (it + 1))
        book.step_end(it + 1, model, opt, save=True)
    book.finish()
    return book


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_run_and_replaces_a_stale_one(tmp_path, capsys):
    import socket
    wd = tmp_path / "w"
    wd.mkdir()
    lock = wd / "run.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getppid()}"):
        one_run(wd)
    assert not (wd / "last.pt").exists()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "then"}))
    one_run(wd)
    assert "stale lock" in capsys.readouterr().err
    assert not lock.exists()  # released by finish()


def test_leftovers_log_cut_and_resume(tmp_path, capsys):
    wd = tmp_path / "w"
    one_run(wd, steps=4, iters=10)
    # as after a kill at iteration 6: two log lines past last.pt's iteration 4, a half-written one, a temp file
    with open(wd / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": 5, "loss": 0.2}) + "\n" + json.dumps({"iter": 6, "loss": 0.1}) + "\n{\"it")
    (wd / ".tmp_last.ptx8y").write_bytes(b"partial")
    with pytest.raises(UserError, match="last.pt exists: pass --resume"):
        one_run(wd, steps=6)
    one_run(wd, steps=6, resume=True)
    err = capsys.readouterr().err
    assert "removed 1 temporary file" in err and "dropped 3 line(s)" in err
    assert not (wd / ".tmp_last.ptx8y").exists()
    iters = [r.get("iter") for r in map(json.loads, open(wd / "log.jsonl")) if "loss" in r]
    assert iters == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(wd / "last.pt")["done"] == 6


def test_resume_refuses_other_flags_and_says_finished(tmp_path):
    wd = tmp_path / "w"
    one_run(wd, steps=4, iters=10)
    with pytest.raises(UserError) as e:
        one_run(wd, resume=True, lr=0.2, dataset="voc", workers=0)
    msg = str(e.value)
    assert "--lr was 0.1, now 0.2" in msg and "--dataset was 'synthetic', now 'voc'" in msg and "--workers was" not in msg
    with pytest.raises(UserError, match="--iters 3: .* already done 4"):
        one_run(wd, resume=True, iters=3)
    one_run(wd, steps=10, resume=True, iters=10, workers=0)  # --workers is harmless, --iters reached
    with pytest.raises(RunFinished, match="finished"):
        one_run(wd, resume=True, iters=10)


# ----------------------------------------------------------------------------------------------------
# data


def test_data_check_names_the_first_bad_file(tmp_path):
    root = write_layout("voc", str(tmp_path / "VOC2012"))
    train = build_dataset("voc", root, "train", None)
    val = build_dataset("voc", root, "val", None)
    assert check_files([train, val], DistInfo()) == len(train) + len(val)
    img, label = val.items[1]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(UserError, match=f"label {label} is 10x10 but its image"):
        check_files([train, val], DistInfo())
    open(train.items[0][0], "wb").write(b"\xff\xd8 not a jpeg")
    with pytest.raises(UserError) as e:
        check_files([train, val], DistInfo())
    assert str(e.value).startswith(f"image {train.items[0][0]} is not a readable image") and "1 more" in str(e.value)


def test_16_bit_images_keep_their_high_byte(tmp_path):
    v = np.array([[0, 255, 256, 1000], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = imread(tmp_path / "g16.png")
    assert got.shape == (2, 4, 3) and np.array_equal(got[..., 0], v >> 8) and np.array_equal(got[..., 2], v >> 8)
    Image.fromarray(np.array([[3, 200]], dtype=np.uint8)).save(tmp_path / "g8.png")
    assert imread(tmp_path / "g8.png")[..., 1].tolist() == [[3, 200]]


# ----------------------------------------------------------------------------------------------------
# pictures


@pytest.mark.parametrize("h,w,scale", [(128, 128, 2), (1024, 2048, 0.5)])
def test_comparison_panels_and_legend(h, w, scale):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = np.zeros((h, w), np.uint8)
    gt[h // 4:h // 2, w // 4:w // 2] = 13
    gt[:, : w // 8] = 255
    pred = gt.copy()
    pred[pred == 255] = 2
    pal = get_palette("cityscapes", 19)
    out = comparison(img, gt, pred, pal, [f"c{k}" for k in range(19)])
    ph, pw = int(h * scale), int(w * scale)
    assert out.shape[1] == 3 * pw + 12 and out.shape[0] > ph
    shown = np.asarray(Image.fromarray(img).resize((pw, ph), Image.NEAREST if scale > 1 else Image.BILINEAR))
    top = next(y for y in range(out.shape[0]) if np.array_equal(out[y, :pw], shown[0]))  # below the titles
    assert 0 < top < 40 and np.array_equal(out[top:top + ph, :pw], shown)
    panel = lambda i: out[top:top + ph, i * (pw + 6):i * (pw + 6) + pw]
    assert np.array_equal(panel(2)[ph // 3, pw // 3], pal[13]) and np.array_equal(panel(1)[ph // 3, pw // 3], pal[13])
    assert np.array_equal(panel(2)[ph - 1, 0], pal[2])              # the prediction where the truth is ignored
    assert np.array_equal(panel(1)[:16, :16], colourize(np.full((16, 16), 255), pal))  # ignored: the checkerboard
    key = out[top + ph:]
    colours = {tuple(c) for c in key.reshape(-1, 3)}
    assert {tuple(pal[0]), tuple(pal[2]), tuple(pal[13])} <= colours and tuple(pal[11]) not in colours


# ----------------------------------------------------------------------------------------------------
# ProPETL's schedule: mmengine's chained LinearLR -> PolyLR, stepped by hand


def mmengine_chain(warmup, total, start=1e-6, power=1.0, eta_min=0.0):
    """The lr factor of every iteration as mmengine computes it: both schedulers step after each iteration
    in their chainable forms, LinearLR on [0, warmup) and PolyLR on [warmup, total), total_iters = end-begin-1."""
    lr, out = 1.0, []
    t_lin, t_poly = warmup - 1, total - warmup - 1
    for g in range(total):
        if g < warmup:
            lr = lr * start if g == 0 else lr * (1 + (1 - start) / (t_lin * start + (g - 1) * (1 - start)))
        elif g > warmup:
            k = g - warmup
            lr = (lr - eta_min) * (1 - 1 / (t_poly - k + 1)) ** power + eta_min
        out.append(lr)
    return out


def test_warmup_poly_is_mmengines_chain():
    ref = mmengine_chain(250, 20000)
    ours = [warmup_poly(it, 20000, 250) for it in range(20000)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert ours[0] == pytest.approx(1e-6) and ours[249] == pytest.approx(1.0) and ours[250] == pytest.approx(1.0)
    assert ours[19999] == 0.0 and ours[19998] > 0
    ref = mmengine_chain(10, 100, power=0.9, eta_min=1e-4)
    np.testing.assert_allclose([warmup_poly(it, 100, 10, power=0.9, min_ratio=1e-4) for it in range(100)], ref,
                               rtol=1e-9)
