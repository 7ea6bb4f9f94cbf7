"""propetl.py: parameter counts against the spec, the adapters' placement and initial identity, frozen
weights staying bit-for-bit, learning on synthetic data, exact resume, clear errors, torchrun."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import propetl
from common.io import UserError, atomic_save, load_checkpoint
from common.swin import SwinTransformer
from tests.seg_layouts import write_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--embed-dim", "16", "--depths", "1", "1", "2", "1", "--num-heads", "1", "2", "2", "4",
        "--head-channels", "32", "--reduction", "4", "--batch-size", "4", "--workers", "0", "--num-samples", "8", "--vis", "0"]


def summary(capsys, *argv):
    propetl.main(["--summary", *argv])
    out = capsys.readouterr().out
    groups = {m[0].strip(): (int(m[1].replace(",", "")), int(m[2].replace(",", "")))
              for m in re.findall(r"^(.+?)\s+([\d,]+)\s+([\d,]+)$", out, re.M)}
    total, trainable = map(int, re.search(r"^params: total=(\d+) trainable=(\d+)$", out, re.M).groups())
    return groups, total, trainable


def test_parameter_counts_match_the_spec(capsys):
    g, _, trainable = summary(capsys, "--stage", "mid", "--dataset", "voc")
    assert g["midstream adapters"] == (1_327_472, 1_327_472)
    assert g["midstream head"] == (2_393_109, 2_393_109)
    assert g["backbone (Swin)"][1] == 0 and trainable == 1_327_472 + 2_393_109
    g, _, _ = summary(capsys, "--stage", "mid", "--dataset", "coco_stuff10k")
    assert g["midstream adapters"][0] == 672_760 and g["midstream head"][0] == 2_360_832 + 1537 * 171
    g, _, _ = summary(capsys, "--stage", "down", "--dataset", "voc")
    assert g["downstream adapters"] == (3_945_568, 3_945_568)
    assert g["midstream adapters"] == (1_327_472, 0)              # loaded and frozen
    g, _, _ = summary(capsys, "--stage", "down", "--dataset", "coco_stuff10k")
    assert g["downstream adapters"] == (1_981_808, 1_981_808)     # r = 48
    # Swin-L + UperNet + aux FCN for ADE20K: mmseg's published 234M, within 1%
    _, total, trainable = summary(capsys, "--stage", "full", "--dataset", "ade20k")
    assert abs(total - 234e6) / 234e6 < 0.01 and trainable == total


def small_args(stage, *extra):
    return propetl.get_args(["--stage", stage, *TINY, *extra])


def test_downstream_starts_as_the_plain_swin():
    """New adapters' up-projection is zero: at step 0 the backbone computes the plain Swin's features,
    whatever the (frozen) midstream adapters hold."""
    torch.manual_seed(0)
    model = propetl.build_model(small_args("down"), 6)
    for n, p in model.backbone.named_parameters():
        if ".adaptmlp." in n:  # midstream adapters: non-zero, as after a midstream run
            torch.nn.init.normal_(p, std=0.5)
    plain = SwinTransformer(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    missing = plain.load_state_dict(model.backbone.state_dict(), strict=False)
    assert not missing.missing_keys
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 70, 90)
    for a, b in zip(model.backbone(x), plain(x)):
        assert torch.equal(a, b)
    # while a midstream model with the same adapters does differ from the plain Swin
    mid = propetl.build_model(small_args("mid"), 6).backbone
    mid.load_state_dict(model.backbone.state_dict(), strict=False)
    mid.eval()
    assert not torch.allclose(mid(x)[-1], plain(x)[-1])


def test_block_wiring_by_hand():
    """TwoConcatBlock = x_f + A_new(cat(x_f, x_f + A_mid(x_a))), written out independently."""
    torch.manual_seed(1)
    blk = propetl.TwoConcatBlock(32, 2, window_size=4, shift_size=2, r=4)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    blk.eval()
    x, hw = torch.randn(2, 6 * 5, 32), (6, 5)
    x_a = x + blk.window_msa(blk.norm1(x), hw)
    a = 0.1 * blk.adaptmlp.up_proj(torch.relu(blk.adaptmlp.down_proj(x_a)))
    x_f = x_a + blk.mlp(blk.norm2(x_a))
    cat = torch.cat([x_f, x_f + a], -1)
    d = 0.1 * blk.adaptmlp_train.up_proj(torch.relu(blk.adaptmlp_train.down_proj(cat)))
    torch.testing.assert_close(blk(x, hw), x_f + d)
    mid = propetl.MidBlock(32, 2, window_size=4, shift_size=2, r=4)
    mid.load_state_dict(blk.state_dict(), strict=False)
    mid.eval()
    torch.testing.assert_close(mid(x, hw), x_f + a)


def test_histogram_target_and_soft_ce():
    label = torch.tensor([[[0, 1], [1, 255]]])
    t = propetl.histogram_target(label, 3)
    assert t.tolist() == [[0.25, 0.5, 0.0]]   # the ignore pixel stays in the denominator
    z = torch.tensor([[1.0, 2.0, 0.5]])
    expected = -(0.25 * torch.log_softmax(z, 1)[0, 0] + 0.5 * torch.log_softmax(z, 1)[0, 1])
    torch.testing.assert_close(propetl.soft_cross_entropy(z, t), expected)
    torch.testing.assert_close(propetl.soft_cross_entropy(z, t), torch.nn.functional.cross_entropy(z, t))


def frozen_state(model_sd, trainable):
    return {k: v for k, v in model_sd.items() if not trainable(k)}


def test_both_stages_train_only_their_parameters(tmp_path):
    """Frozen weights are bit-for-bit those of the checkpoints they came from after training steps."""
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    official = {"model": {k: v for k, v in swin.state_dict().items() if not k.startswith("norm")}}
    atomic_save(official, tmp_path / "swin.pth")
    propetl.main(["--stage", "mid", *TINY, "--iters", "3", "--pretrained", str(tmp_path / "swin.pth"),
                  "--work-dir", str(tmp_path / "mid")])
    mid = load_checkpoint(tmp_path / "mid" / "last.pt")["model"]
    for k, v in official["model"].items():
        assert torch.equal(mid["backbone." + k], v), k
    adapters = {k: v for k, v in mid.items() if ".adaptmlp.up_proj.weight" in k}
    assert adapters and all(v.abs().sum() > 0 for v in adapters.values())  # they trained

    propetl.main(["--stage", "down", *TINY, "--iters", "3", "--eval-interval", "3", "--pretrained",
                  str(tmp_path / "swin.pth"), "--mid-checkpoint", str(tmp_path / "mid" / "last.pt"),
                  "--work-dir", str(tmp_path / "down")])
    down = load_checkpoint(tmp_path / "down" / "last.pt")["model"]
    for k, v in official["model"].items():
        assert torch.equal(down["backbone." + k], v), k
    for k, v in mid.items():
        if ".adaptmlp." in k:
            assert torch.equal(down[k], v), k
    for i in range(4):  # out norms: not in the checkpoint, frozen at identity
        assert torch.equal(down[f"backbone.norm{i}.weight"], torch.ones_like(down[f"backbone.norm{i}.weight"]))
    new = [v for k, v in down.items() if ".adaptmlp_train.up_proj.weight" in k]
    assert new and all(v.abs().sum() > 0 for v in new)
    assert os.path.exists(tmp_path / "down" / "best.pt")


def test_resume_is_exact(tmp_path):
    common = ["--stage", "down", *TINY, "--iters", "6", "--eval-interval", "100", "--ckpt-interval", "100"]
    mid = tmp_path / "mid"
    propetl.main(["--stage", "mid", *TINY, "--iters", "1", "--work-dir", str(mid)])
    common += ["--mid-checkpoint", str(mid / "last.pt")]
    propetl.main([*common, "--work-dir", str(tmp_path / "a")])
    propetl.main([*common, "--work-dir", str(tmp_path / "b"), "--stop-at", "3"])
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iter"] == 3
    propetl.main([*common, "--work-dir", str(tmp_path / "b"), "--resume"])
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["iter"] == b["iter"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])


def test_a_short_run_learns(tmp_path):
    """Loss falls, and foreground classes get segmented: predicting the majority class (background) gives
    IoU 0 on every foreground class and mIoU = background share / K (about 15 here)."""
    args = ["--stage", "adaptformer", "--dataset", "synthetic", "--embed-dim", "32", "--depths", "1", "1", "2", "1",
            "--num-heads", "1", "2", "4", "8", "--head-channels", "64", "--batch-size", "8", "--workers", "0",
            "--iters", "400", "--eval-interval", "400", "--log-interval", "50", "--num-samples", "64", "--vis", "2",
            "--work-dir", str(tmp_path)]
    m = propetl.main(args)
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    background_share = m["IoU"][0] / 100  # upper bound of the majority predictor's only non-zero IoU
    assert m["mIoU"] > 35.0 and m["mIoU"] > 2 * 100 * background_share / 6
    assert sum(iou > 20 for iou in m["IoU"][1:]) >= 3, m["IoU"]
    assert len(os.listdir(tmp_path / "vis" / "iter_400")) == 2


def run_cli(*argv, cwd=ROOT):
    r = subprocess.run([sys.executable, "propetl.py", *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stderr


def test_user_errors_are_one_clear_line(tmp_path):
    # a corrupt image read inside a DataLoader worker process: still one line
    root = write_layout("voc", str(tmp_path / "VOC2012"))
    for name in open(os.path.join(root, "ImageSets", "Segmentation", "train.txt")).read().split():
        open(os.path.join(root, "JPEGImages", name + ".jpg"), "wb").write(b"garbage")
    rc, err = run_cli("--stage", "mid", "--dataset", "voc", "--data-root", root, *TINY[2:], "--workers", "1",
                      "--work-dir", str(tmp_path / "w0"))
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error:") and ".jpg" in last and "Traceback" not in err, err
    assert sum(l.startswith("error:") for l in err.splitlines()) == 1
    rc, err = run_cli("--stage", "mid", "--dataset", "voc", "--data-root", str(tmp_path / "nowhere"), *TINY[2:],
                      "--work-dir", str(tmp_path / "w"))
    assert rc == 2 and "nowhere" in err and "Traceback" not in err and err.startswith("error:")
    # a checkpoint of another architecture
    atomic_save({"model": torch.nn.Conv2d(3, 8, 3).state_dict()}, tmp_path / "resnet.pth")
    rc, err = run_cli("--stage", "mid", *TINY, "--pretrained", str(tmp_path / "resnet.pth"),
                      "--work-dir", str(tmp_path / "w2"))
    assert rc == 2 and "resnet.pth" in err and "Traceback" not in err
    # a checkpoint with a Python object beside wrong weights: the object is kept inert, the weights refused
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse_namespace()}, tmp_path / "pickled.pth")
    rc, err = run_cli("--stage", "mid", *TINY, "--pretrained", str(tmp_path / "pickled.pth"),
                      "--work-dir", str(tmp_path / "w3"))
    assert rc == 2 and "argparse.Namespace" in err and "pickled.pth does not fit" in err


def argparse_namespace():
    import argparse
    return argparse.Namespace(lr=1.0)


@pytest.mark.parametrize("damage", ["missing_split", "corrupt_image", "label_out_of_range"])
def test_bad_dataset_files_are_named(tmp_path, damage):
    root = write_layout("voc", str(tmp_path / "VOC2012"))
    if damage == "missing_split":
        os.remove(os.path.join(root, "ImageSets", "Segmentation", "train.txt"))
        culprit = "train.txt"
    else:
        name = open(os.path.join(root, "ImageSets", "Segmentation", "train.txt")).read().split()[0]
        if damage == "corrupt_image":
            culprit = os.path.join(root, "JPEGImages", name + ".jpg")
            open(culprit, "wb").write(b"\xff\xd8 truncated")
        else:
            from PIL import Image
            import numpy as np
            culprit = os.path.join(root, "SegmentationClass", name + ".png")
            Image.fromarray(np.full((48, 64), 40, np.uint8)).save(culprit)
    with pytest.raises(UserError) as e:
        args = ["--stage", "mid", "--dataset", "voc", "--data-root", root, *TINY[2:], "--iters", "2", "--workers", "0",
                "--work-dir", str(tmp_path / "w")]
        propetl.main(args)
    assert os.path.basename(culprit) in str(e.value)


def test_failed_runs_never_clobber_checkpoints(tmp_path):
    w = tmp_path / "w"
    propetl.main(["--stage", "down", *TINY, "--iters", "2", "--eval-interval", "2", "--work-dir", str(w),
                  "--mid-checkpoint", str(_mid(tmp_path))])
    before = {f: open(w / f, "rb").read() for f in ("last.pt", "best.pt")}
    # a new run in the same work dir is refused before anything is written
    with pytest.raises(UserError, match="--resume"):
        propetl.main(["--stage", "down", *TINY, "--iters", "2", "--work-dir", str(w), "--mid-checkpoint", str(_mid(tmp_path))])
    # a resumed run that fails on its data leaves both files as they were
    with pytest.raises(UserError):
        propetl.main(["--stage", "down", "--dataset", "voc", "--data-root", str(tmp_path / "none"), *TINY[2:],
                      "--iters", "4", "--work-dir", str(w), "--resume"])
    assert {f: open(w / f, "rb").read() for f in ("last.pt", "best.pt")} == before


def _mid(tmp_path):
    p = tmp_path / "mid" / "last.pt"
    if not p.exists():
        propetl.main(["--stage", "mid", *TINY, "--iters", "1", "--work-dir", str(tmp_path / "mid")])
    return p


def test_quick_start_under_torchrun(tmp_path):
    """Two CPU processes (gloo): the midstream then the downstream stage, as the README's quick start."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "propetl.py", *TINY]
    r = subprocess.run([*base, "--stage", "mid", "--iters", "4", "--work-dir", str(tmp_path / "mid")], cwd=ROOT,
                       env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    r = subprocess.run([*base, "--stage", "down", "--iters", "4", "--eval-interval", "4", "--vis", "2",
                        "--mid-checkpoint", str(tmp_path / "mid" / "last.pt"), "--work-dir", str(tmp_path / "down")],
                       cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mIoU" in r.stdout + r.stderr
    for f in ("last.pt", "best.pt", "log.jsonl"):
        assert (tmp_path / "down" / f).exists()
    assert len(os.listdir(tmp_path / "down" / "vis" / "iter_4")) == 2
    evals = [json.loads(l) for l in open(tmp_path / "down" / "log.jsonl") if "mIoU" in l]
    assert len(evals) == 1 and 0 <= evals[0]["mIoU"] <= 100
