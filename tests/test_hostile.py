"""Hostile inputs to the three scripts, as a new user would try them: each ends with one clear error naming
the flag or file, before any work, and never touches an existing last.pt / best.pt. Tables of command
lines and expected fragments, run in-process (main(argv), SystemExit / UserError caught); the malicious
pickle at every flag that reads a checkpoint; official checkpoint layouts; one torchrun job in which one
rank fails (its error line is the one the user reads)."""
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import propetl
import vit_adapter_seg as VA
import vpetl_video as VP
from common.io import RunFinished, UserError, load_checkpoint
from tests.seg_layouts import write_layout
from tests.test_safety import HistoryBuffer, _fake_module, malicious_payloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P_TINY = ["--dataset", "synthetic", "--embed-dim", "16", "--depths", "1", "1", "2", "1", "--num-heads", "1", "2", "2",
          "4", "--head-channels", "32", "--reduction", "4", "--batch-size", "4", "--workers", "0", "--num-samples", "8",
          "--vis", "0"]
V_TINY = ["--preset", "synthetic", "--batch-size", "4", "--warmup", "1", "--workers", "0", "--vis", "0",
          "--num-samples", "8"]
VP_TINY = ("--data-set synthetic --model swin_tiny --embed-dim 16 --depths 1 1 2 1 --num-heads 1 2 2 4 --input-size 32 "
           "--window-size 8 4 4 --fulltune --opt adamw --lr 1e-3 --warmup-epochs 1 --batch-size 4 --num-workers 0 "
           "--test-num-crop 1 --test-num-segment 1 --synthetic-videos 8 4 4").split()


def error_of(main, argv, capsys):
    """The error a command line ends with: parser.error's last stderr line or the UserError's message."""
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 2, e.code
        return capsys.readouterr().err.strip().splitlines()[-1]
    except UserError as e:
        return "error: " + str(e)
    raise AssertionError(f"no error for {argv}")


def _file(tmp_path):
    p = tmp_path / "a_file"
    p.write_text("x")
    return str(p)


# ----------------------------------------------------------------------------------------------------
# flags refused by get_args, one table per script ({f} = an existing file, {t} = tmp_path)

PROPETL_FLAGS = [
    (["--stage", "mid", "--lr", "-1"], "--lr -1.0: expected a positive number"),
    (["--stage", "mid", "--workers", "-1"], "--workers -1: expected 0 or more"),
    (["--stage", "mid", "--work-dir", "/proc/run"], "--work-dir /proc/run: cannot create anything in /proc"),
    (["--stage", "mid", "--work-dir", "{f}"], "exists and is not a folder"),
    (["--stage", "mid", "--work-dir", "{f}/sub"], "is a file, so"),
    (["--stage", "adaptformer", "--batch-size", "0"], "--batch-size 0: expected a positive number"),
    (["--stage", "adaptformer", "--batch-size", "1"], "BatchNorm in the UperNet and FCN heads needs 2"),
    (["--stage", "mid", "--ckpt-interval", "0"], "--ckpt-interval 0: expected a positive number"),
    (["--stage", "adaptformer", "--eval-interval", "0"], "--eval-interval 0: expected a positive number"),
    (["--stage", "mid", "--iters", "0"], "--iters 0: expected a positive number"),
    (["--stage", "mid", "--iters", "-5"], "--iters -5: expected a positive number"),
    (["--stage", "adaptformer", "--crop", "0"], "--crop 0 0: expected a positive number"),
    (["--stage", "mid", "--drop-path", "1.5"], "--drop-path 1.5: expected a value in [0, 1)"),
    (["--stage", "mid", "--eval-only"], "--eval-only evaluates a segmentation checkpoint"),
    (["--stage", "mid", "--pretrained", "{t}/nowhere.pth"], "--pretrained {t}/nowhere.pth: file not found"),
    (["--stage", "down", "--work-dir", "{t}/w"], "--stage down needs --mid-checkpoint"),
]
VIT_FLAGS = [
    (["--crop", "0"], "--crop 0: expected a positive number"),
    (["--eval-interval", "0"], "--eval-interval 0: expected a positive number"),
    (["--stride", "0"], "--stride 0: expected a positive number"),
    (["--stride", "96"], "--stride 96 is larger than the window --crop 64"),
    (["--lr", "-1"], "--lr -1.0: expected a positive number"),
    (["--workers", "-1"], "--workers -1: expected 0 or more"),
    (["--iters", "0"], "--iters 0: expected a positive number"),
    (["--opacity", "2"], "--opacity 2.0: expected a value in [0, 1]"),
    (["--work-dir", "/proc/run"], "--work-dir /proc/run: cannot create anything in /proc"),
    (["--work-dir", "{f}"], "exists and is not a folder"),
    (["--demo", "{t}/photo.png"], "--demo {t}/photo.png: file not found"),
]
VPETL_FLAGS = [
    (["--batch-size", "0"], "--batch-size 0: expected a positive number"),
    (["--input-size", "0"], "--input-size 0: expected a positive number"),
    (["--epochs", "0"], "--epochs 0: expected a positive number"),
    (["--lr", "-1"], "--lr -1.0: expected a positive number"),
    (["--num-workers", "-1"], "--num-workers -1: expected 0 or more"),
    (["--work-dir", "/proc/run"], "--work-dir /proc/run: cannot create anything in /proc"),
    (["--work-dir", "{f}"], "exists and is not a folder"),
    (["--data-set", "imagenet"], "--data-set imagenet: expected one of"),
    (["--num-frames", "1"], "--num-frames 1: expected 2 or more"),
]


def _fill(items, tmp_path):
    f = _file(tmp_path)
    return [x.replace("{f}", f).replace("{t}", str(tmp_path)) for x in items]


@pytest.mark.parametrize("main,base,argv,fragment",
                         [(propetl.main, P_TINY, a, f) for a, f in PROPETL_FLAGS] +
                         [(VA.main, V_TINY, a, f) for a, f in VIT_FLAGS] +
                         [(VP.main, VP_TINY, a, f) for a, f in VPETL_FLAGS],
                         ids=lambda x: x.__module__ if callable(x) else None)
def test_bad_flags_are_one_error_line(tmp_path, capsys, main, base, argv, fragment):
    argv = _fill(argv, tmp_path)
    if "--work-dir" not in argv:
        argv += ["--work-dir", str(tmp_path / "w")]
    err = error_of(main, [*base, *argv], capsys)
    assert err.startswith("error: ") and _fill([fragment], tmp_path)[0] in err, err
    assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")  # no work started


# ----------------------------------------------------------------------------------------------------
# checkpoints: the malicious pickle and wrong contents at every flag that reads one


def _mid(tmp_path):
    p = tmp_path / "mid" / "last.pt"
    if not p.exists():
        propetl.main(["--stage", "mid", *P_TINY, "--iters", "1", "--work-dir", str(tmp_path / "mid")])
    return str(p)


def _calls(tmp_path, path):
    """(main, argv) per flag that reads a checkpoint, reading ``path``; --resume reads work/last.pt."""
    w = str(tmp_path / "w")
    return {
        "propetl --pretrained": (propetl.main, ["--stage", "mid", *P_TINY, "--pretrained", path, "--work-dir", w]),
        "propetl --mid-checkpoint": (propetl.main, ["--stage", "down", *P_TINY, "--mid-checkpoint", path, "--work-dir", w]),
        "propetl --checkpoint": (propetl.main, ["--stage", "down", *P_TINY, "--eval-only", "--checkpoint", path,
                                                "--work-dir", w]),
        "propetl --resume": (propetl.main, ["--stage", "mid", *P_TINY, "--resume", "--work-dir", w]),
        "vit --pretrained": (VA.main, [*V_TINY, "--pretrained", path, "--work-dir", w]),
        "vit --checkpoint": (VA.main, [*V_TINY, "--eval-only", "--checkpoint", path, "--work-dir", w]),
        "vit --resume": (VA.main, [*V_TINY, "--resume", "--work-dir", w]),
        "vpetl --finetune": (VP.main, [*VP_TINY, "--finetune", path, "--work-dir", w]),
        "vpetl --checkpoint": (VP.main, [*VP_TINY, "--eval-only", "--checkpoint", path, "--work-dir", w]),
        "vpetl --resume": (VP.main, [*VP_TINY, "--resume", "--work-dir", w]),
    }


FLAGS = ["propetl --pretrained", "propetl --mid-checkpoint", "propetl --checkpoint", "propetl --resume",
         "vit --pretrained", "vit --checkpoint", "vit --resume", "vpetl --finetune", "vpetl --checkpoint",
         "vpetl --resume"]


def _plant(tmp_path, flag, obj):
    path = str(tmp_path / "given.pth")
    torch.save(obj, path)
    if flag.endswith("--resume"):
        os.makedirs(tmp_path / "w", exist_ok=True)
        torch.save(obj, tmp_path / "w" / "last.pt")
    return path


@pytest.mark.parametrize("flag", FLAGS)
def test_malicious_pickle_is_refused_at_every_flag(tmp_path, capsys, flag):
    marker = tmp_path / "pwned"
    path = _plant(tmp_path, flag, {"state_dict": {"w": torch.ones(1)}, "model": {"w": torch.ones(1)},
                                   "x": malicious_payloads(marker)["os.system"]})
    main, argv = _calls(tmp_path, path)[flag]
    err = error_of(main, argv, capsys)
    assert "refused" in err and "posix.system" in err, err
    assert not marker.exists()


WRONG = {"a tensor": torch.ones(3), "a list": [torch.ones(1), 2], "a dict without weights": {"epoch": 3, "lr": 0.1}}


@pytest.mark.parametrize("flag,content", [(f, c) for f in FLAGS for c in WRONG
                                          if f.startswith("propetl") or c == "a tensor"])
def test_wrong_contents_are_one_error(tmp_path, capsys, flag, content):
    path = _plant(tmp_path, flag, WRONG[content])
    main, argv = _calls(tmp_path, path)[flag]
    err = error_of(main, argv, capsys)
    assert err.startswith("error: ") and ("given.pth" in err or "last.pt" in err), err
    assert re.search(r"holds|no segmentor weights|expected", err), err


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 truncated"])
def test_damaged_npz_as_vit_pretrained(tmp_path, capsys, data):
    path = tmp_path / "augreg.npz"
    path.write_bytes(data)
    err = error_of(VA.main, [*V_TINY, "--pretrained", str(path), "--work-dir", str(tmp_path / "w")], capsys)
    assert "augreg.npz: not a ViT .npz" in err, err


# ----------------------------------------------------------------------------------------------------
# runs overwritten, resumed with other flags, finished


def test_vpetl_refuses_to_overwrite_and_to_resume_on_other_data(tmp_path, capsys):
    w = str(tmp_path / "w")
    VP.main([*VP_TINY, "--epochs", "1", "--work-dir", w])
    before = {f: open(os.path.join(w, f), "rb").read() for f in ("last.pt", "best.pt")}
    err = error_of(VP.main, [*VP_TINY, "--epochs", "2", "--work-dir", w], capsys)
    assert "last.pt exists: pass --resume" in err
    root = tmp_path / "hmdb"
    root.mkdir()
    for name in ("train.csv", "test.csv", "val.csv"):
        (root / name).write_text("")
    err = error_of(VP.main, [*VP_TINY, "--epochs", "2", "--data-set", "HMDB51", "--data-path", str(root),
                             "--resume", "--work-dir", w], capsys)
    assert "--data-set was 'synthetic', now 'HMDB51'" in err and "--data-path was None" in err
    with pytest.raises(RunFinished, match="finished"):
        VP.main([*VP_TINY, "--epochs", "1", "--resume", "--work-dir", w])
    assert {f: open(os.path.join(w, f), "rb").read() for f in ("last.pt", "best.pt")} == before


def test_propetl_resume_with_other_flags(tmp_path, capsys):
    w = str(tmp_path / "w")
    propetl.main(["--stage", "mid", *P_TINY, "--iters", "2", "--stop-at", "1", "--work-dir", w])
    before = open(os.path.join(w, "last.pt"), "rb").read()
    for flags, fragment in ((["--lr", "0.5"], "--lr was 0.001, now 0.5"),
                            (["--batch-size", "2"], "--batch-size was 4, now 2"),
                            (["--crop", "32"], "--crop was [64, 64], now [32, 32]")):
        err = error_of(propetl.main, ["--stage", "mid", *P_TINY, "--iters", "2", *flags, "--resume", "--work-dir", w],
                       capsys)
        assert fragment in err, err
    assert open(os.path.join(w, "last.pt"), "rb").read() == before
    propetl.main(["--stage", "mid", *P_TINY, "--iters", "2", "--workers", "1", "--resume", "--work-dir", w])
    with pytest.raises(RunFinished, match=r"finished \(2 of --iters 2 done\)"):
        propetl.main(["--stage", "mid", *P_TINY, "--iters", "2", "--resume", "--work-dir", w])


def test_data_errors_found_before_training_or_after_last_pt(tmp_path):
    root = write_layout("voc", str(tmp_path / "VOC2012"))
    name = open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")).read().split()[-1]
    bad = os.path.join(root, "JPEGImages", name + ".jpg")
    open(bad, "wb").write(b"garbage")
    argv = ["--stage", "adaptformer", "--dataset", "voc", "--data-root", root, *P_TINY[2:], "--crop", "32",
            "--scale", "64", "48", "--test-scale", "64", "48", "--iters", "2", "--eval-interval", "2"]
    with pytest.raises(UserError, match=re.escape(bad) + ".*data check"):
        propetl.main([*argv, "--work-dir", str(tmp_path / "a")])
    assert not os.path.exists(tmp_path / "a" / "last.pt")
    # without the check, the evaluation finds it: last.pt of that iteration is already written
    with pytest.raises(UserError, match=re.escape(bad)):
        propetl.main([*argv, "--skip-data-check", "--work-dir", str(tmp_path / "b")])
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iter"] == 2


def test_vit_demo_never_writes_over_its_input(tmp_path):
    args = VA.get_args(["--preset", "synthetic"])
    ck = tmp_path / "model.pt"
    torch.save({"model": VA.build_model(args, 6).state_dict()}, ck)
    photo = tmp_path / "photo.png"
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(photo)
    out, pred = VA.main(["--preset", "synthetic", "--demo", str(photo), "--checkpoint", str(ck), "--work-dir",
                         str(tmp_path), "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(photo)), img)  # the photograph is untouched
    assert out == str(tmp_path / "photo_seg.png") and os.path.isfile(tmp_path / "photo_seg_legend.png")


# ----------------------------------------------------------------------------------------------------
# official checkpoints


def test_propetl_official_layouts(tmp_path):
    """The official downstream iter_*.pth (mmseg Swin keys, heads, message hub) evaluates exactly as our
    best.pt; the official midstream file (backbone.final_proj*) gives --stage down its adapters."""
    from tests.test_swin import official_to_mmseg
    cleanup = _fake_module("mmengine.logging.history_buffer", HistoryBuffer)
    w = tmp_path / "down"
    propetl.main(["--stage", "down", *P_TINY, "--iters", "1", "--eval-interval", "1", "--mid-checkpoint",
                  _mid(tmp_path), "--work-dir", str(w)])
    ours = load_checkpoint(w / "best.pt")["model"]
    bb = official_to_mmseg({k[len("backbone."):]: v for k, v in ours.items() if k.startswith("backbone.")})
    official = {**{"backbone." + k: v for k, v in bb.items()},
                **{k: v for k, v in ours.items() if not k.startswith("backbone.")}}
    hub = {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": 1}}
    torch.save({"meta": {"iter": 1}, "state_dict": official, "message_hub": hub}, tmp_path / "iter_1.pth")
    mid = load_checkpoint(_mid(tmp_path))["model"]
    mid_bb = official_to_mmseg({k[len("backbone."):]: v for k, v in mid.items() if k.startswith("backbone.")})
    mid_official = {**{"backbone." + k: v for k, v in mid_bb.items()},
                    **{"backbone." + k: v for k, v in mid.items() if k.startswith("final_proj")}}
    torch.save({"meta": {}, "state_dict": mid_official, "message_hub": hub}, tmp_path / "iter_mid.pth")
    cleanup()
    common = ["--stage", "down", *P_TINY, "--eval-only", "--work-dir", str(tmp_path / "e")]
    a = propetl.main([*common, "--checkpoint", str(w / "best.pt")])
    b = propetl.main([*common, "--checkpoint", str(tmp_path / "iter_1.pth")])
    assert a == b
    sd = propetl.from_official(mid_official)
    assert torch.equal(sd["final_proj.weight"], mid["final_proj.weight"])
    model = propetl.build_model(propetl.get_args(["--stage", "down", *P_TINY, "--mid-checkpoint",
                                                  str(tmp_path / "iter_mid.pth")]), 6)
    propetl.load_weights(propetl.get_args(["--stage", "down", *P_TINY, "--mid-checkpoint",
                                           str(tmp_path / "iter_mid.pth")]), model)
    own = model.state_dict()
    adapters = [k for k in mid if ".adaptmlp." in k]
    assert adapters and all(torch.equal(own[k], mid[k]) for k in adapters)


def test_vpetl_official_layouts(tmp_path):
    """Upstream's checkpoint-best.pth (the Swin itself, keys without 'backbone.', args as a Namespace) tests
    as our best.pt; an MMAction2 1.x Video Swin (final norm 'backbone.norm3') loads as --finetune."""
    w = str(tmp_path / "w")
    ours = VP.main([*VP_TINY, "--epochs", "1", "--work-dir", w])
    sd = load_checkpoint(os.path.join(w, "best.pt"))["model"]
    upstream = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    torch.save({"model": upstream, "epoch": 0, "scaler": {}, "optimizer": {},
                "args": argparse.Namespace(data_set="synthetic", lr=1e-3)}, tmp_path / "checkpoint-best.pth")
    res = VP.main([*VP_TINY, "--eval-only", "--checkpoint", str(tmp_path / "checkpoint-best.pth"),
                   "--work-dir", str(tmp_path / "e")])
    assert res["top1"] == ours["top1"] and res["loss"] == pytest.approx(ours["loss"])
    mm = {"backbone." + k.replace("norm.", "norm3.") if k.startswith("norm.") else "backbone." + k: v
          for k, v in upstream.items() if not k.startswith("fc.")}
    mm["cls_head.fc_cls.weight"] = torch.zeros(400, 128)
    torch.save({"meta": {}, "state_dict": mm}, tmp_path / "mmaction2.pth")
    model = VP.build_model(VP.get_args(VP_TINY))
    layout, _ = VP.load_backbone(model, str(tmp_path / "mmaction2.pth"))
    assert "norm3" in layout
    assert torch.equal(model.backbone.norm.weight, upstream["norm.weight"])


# ----------------------------------------------------------------------------------------------------
# under torchrun: one rank fails on its data, the other leaves quietly


def test_torchrun_one_rank_fails_one_error_line(tmp_path):
    root = write_layout("voc", str(tmp_path / "VOC2012"), n_train=6)
    # with seed 0 and 2 images per process, rank 1 draws training items 5 and 0 first, rank 0 items 2 and 3
    from common.seg_data import build_dataset
    label = build_dataset("voc", root, "train", None).items[5][1]
    im = Image.open(label)
    out = Image.fromarray(np.full(np.asarray(im).shape, 40, np.uint8), "P")  # a class VOC does not have
    out.putpalette(im.getpalette())
    out.save(label)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "propetl.py",
           "--stage", "adaptformer", "--dataset", "voc", "--data-root", root, *P_TINY[2:], "--crop", "32",
           "--scale", "64", "48", "--test-scale", "64", "48", "--iters", "4", "--work-dir", str(tmp_path / "w")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    err = r.stderr
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and label in ours[0] and "out of range" in ours[0], err[-3000:]
    # no traceback from the two processes: only the launcher's own (ChildFailedError), whose summary
    # ends with the failing process's line
    assert err.count("Traceback (most recent call last)") <= 1 and "UserError" not in err
    assert "DistBackendError" not in err and "RuntimeError" not in err and "Connection closed" not in err
    summary = [line.strip() for line in err.splitlines() if line.strip().startswith("traceback :")]
    assert summary and summary[-1] == "traceback : " + ours[0], err[-3000:]
    assert not os.path.exists(tmp_path / "w" / "last.pt")
