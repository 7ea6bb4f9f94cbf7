"""vpetl_video.py: the spec's parameter counts (table 2.5), the modules against hand-written formulas (adapter 0
at init, PATT in its four modes with standard attention, prefix tuning, the head's (1,2,2,1)/6 form), the
trainable set, the clip samplers against hand-computed indices, the csv / mp4 / frame-folder pipeline and
the bad-video policy, resume, and learning under torchrun on the synthetic motion set (where one frame
carries no class information) with exact multi-view evaluation over 2 processes."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vpetl_video as V
from common.io import UserError, load_checkpoint
from common.video_swin import shift_mask

sys.path.insert(0, os.path.dirname(__file__))
import video_utils as U  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = "--finetune pre_trained/swin_base_patch244_window877_kinetics400_22k.pth --ffn_adapt --att_prefix " \
         "--att_preseqlen 16 --att_mid_dim 128 --att_prefix_mode patt_kv --att_prefix_scale 0.8 " \
         "--tuned_backbone_layer_fc True --num_frames 8 --sampling_rate 2 --model swin_transformer"
# the README's quick start (less the work dir); the test set is odd-sized so sharding would show duplicates
QUICK_START = ("--data-set synthetic --model swin_tiny --embed-dim 32 --depths 1 1 1 1 --num-heads 1 2 4 8 "
               "--input-size 32 --window-size 8 4 4 --fulltune --opt adamw --lr 1e-3 --epochs 4 --warmup-epochs 1 "
               "--batch-size 16 --num-workers 0 --test-num-crop 1")
TINY = "--model swin_tiny --embed-dim 16 --depths 1 1 2 1 --num-heads 1 2 2 4 --input-size 32 --window-size 8 4 4"



# ----------------------------------------------------------------------------------------------------
# parameter counts: spec 2.5 (Swin-B built on the meta device)

@pytest.mark.parametrize("flags,trainable", [
    (f"--data_set HMDB51 {README}", 6_253_363),                         # the README command
    (f"--data_set SSV2 {README}", 6_379_438),
    ("--data-set HMDB51 --ffn-adapt", 1_605_939),                       # AdaptFormer-Swin r=64
    ("--data-set SSV2 --att-prefix --att-mid-dim 128", 4_825_774),      # PATT-kv m=128
    ("--data-set HMDB51", 52_275),                                      # linear probe
    ("--data-set SSV2 --fulltune", 87_817_334),
    ("--data-set HMDB51 --att-prefix --att-prefix-mode patt_qkv", 6_199_552 + 52_275),
    ("--data-set HMDB51 --att-prefix --att-prefix-mode prefix --att-preseqlen 16", 2 * 16 * 12_032 + 52_275),
    ("--data-set HMDB51 --ffn-adapt --att-prefix --tbl_fc False", 6_201_088),
])
def test_parameter_counts(flags, trainable, capsys):
    total, tr = V.run(V.get_args(flags.split() + ["--summary"]))
    assert tr == trainable
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"params: total={total} trainable={tr}"
    nc = 174 if "SSV2" in flags else 51
    petl = {"6253363": 6_201_088, "6379438": 6_201_088}.get(str(tr))
    if petl:
        assert total == 87_638_984 + petl + 1025 * nc


# ----------------------------------------------------------------------------------------------------
# the modules, against formulas written here

def tiny_args(extra=""):
    return V.get_args(f"{TINY} --drop-path 0.0 {extra}".split())


def test_adapter_is_zero_at_init_and_head_is_weighted_linear():
    torch.manual_seed(0)
    plain, adapted = V.build_model(tiny_args()), V.build_model(tiny_args("--ffn-adapt"))
    missing = adapted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".mlp.adaptmlp." in k for k in missing)
    up = adapted.backbone.layers[2].blocks[1].mlp.adaptmlp.up_proj
    assert up.weight.abs().sum() == 0 and up.bias.abs().sum() == 0
    assert adapted.backbone.layers[0].blocks[0].mlp.adaptmlp.scale == 0.1
    x = torch.randn(2, 3, 8, 32, 32)
    assert torch.equal(plain.eval()(x), adapted.eval()(x))
    # head: avg_pool3d (2, H, W) stride 1 -> Conv3d -> mean == Linear on the (1,2,2,1)/6 temporal mean
    f = plain.backbone(x)  # (2, C, 4, 1, 1)
    pooled = f.mean((3, 4))  # (2, C, 4)
    w = torch.tensor([1, 2, 2, 1.0]) / 6
    ref = F.linear((pooled * w).sum(-1), plain.fc[0].weight.flatten(1), plain.fc[0].bias)
    assert torch.allclose(plain(x), ref, atol=1e-5)


def reference_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v written out."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, -1) @ v


@pytest.mark.parametrize("mode", ["patt_kv", "patt_qv", "patt_qk", "patt_qkv", "prefix"])
def test_patt_and_prefix_against_formula(mode):
    torch.manual_seed(0)
    dim, heads, ws = 16, 2, (2, 2, 2)
    kw = dict(length=3) if mode == "prefix" else dict(mode=mode, mid_dim=8, scale=0.8)
    att = (V.PrefixAttention if mode == "prefix" else V.PattAttention)(dim, ws, heads, **kw)
    att.reset_parameters()
    mask = shift_mask((4, 2, 2), ws, (1, 0, 0), "cpu")  # 2 windows
    x = torch.randn(2 * 2, 8, dim)  # (B * nW, N, C)
    out = att(x, mask)  # the bias table needs a gradient: the written-out path
    with torch.no_grad():
        assert torch.allclose(att(x, mask), out, atol=1e-5)  # scaled_dot_product_attention
    # by hand: qkv heads, the module's additions, standard attention with bias + mask, proj
    qkv = F.linear(x, att.qkv.weight, att.qkv.bias).view(4, 8, 3, heads, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = att.relative_position_bias_table[att.relative_position_index.flatten()].view(8, 8, heads).permute(2, 0, 1)
    bias = (bias[None] + mask[:, None]).repeat(2, 1, 1, 1)  # (nW, nH, N, N) -> (B * nW, nH, N, N), batch outer
    if mode == "prefix":
        p = att.prefix_kv.view(2, 3, heads, 8).transpose(1, 2)  # (2, nH, L, hd)
        k = torch.cat([p[0].expand(4, -1, -1, -1), k], 2)
        v = torch.cat([p[1].expand(4, -1, -1, -1), v], 2)
        bias = torch.cat([torch.zeros(4, heads, 8, 3), bias], -1)
    else:
        d = att.qkv_adapter[2](torch.tanh(att.qkv_adapter[0](x)))
        d = d.view(4, 8, len(mode) - 5, heads, 8).permute(2, 0, 3, 1, 4)
        parts = {"q": q, "k": k, "v": v}
        for i, t in enumerate(mode[5:]):
            parts[t] = parts[t] + 0.8 * d[i]
        q, k, v = parts["q"], parts["k"], parts["v"]
    ref = reference_attention(q, k, v, bias).transpose(1, 2).reshape(4, 8, dim)
    ref = F.linear(ref, att.proj.weight, att.proj.bias)
    assert torch.allclose(out, ref, atol=1e-5)
    # frozen backbone (the table needs no gradient): the SDPA path, and its backward, for PATT / the prefix
    att.relative_position_bias_table.requires_grad_(False)
    new = [p for n, p in att.named_parameters() if "qkv_adapter" in n or "prefix" in n]
    g_formula = torch.autograd.grad(ref.square().sum(), new, retain_graph=True)
    g_sdpa = torch.autograd.grad(att(x, mask).square().sum(), new)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_formula, g_sdpa))
    # the module is not a no-op (PATT's default init perturbs the pretrained attention, as upstream)
    plain = V.WindowAttention3D(dim, ws, heads)
    plain.load_state_dict(att.state_dict(), strict=False)
    assert (plain(x, mask) - out).abs().max() > 1e-3


def test_pretrained_backbone_loads_into_the_petl_model(tmp_path):
    torch.manual_seed(0)
    plain = V.build_model(tiny_args())
    path = tmp_path / "official.pth"
    sd = {"backbone." + k: v for k, v in plain.backbone.state_dict().items()}
    sd["cls_head.fc_cls.weight"], sd["cls_head.fc_cls.bias"] = torch.zeros(400, 128), torch.zeros(400)
    torch.save({"state_dict": sd}, path)
    model = V.build_model(tiny_args("--ffn-adapt --att-prefix"))
    assert V.load_backbone(model, path) == ("official (mmaction, backbone.*)", 5 * (4 + 4))  # 5 blocks
    own = model.state_dict()
    assert all(torch.equal(own["backbone." + k], v) for k, v in plain.backbone.state_dict().items())
    # a checkpoint lacking a backbone tensor is refused, naming it
    del sd["backbone.layers.3.blocks.0.norm2.weight"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(UserError, match="layers.3.blocks.0.norm2.weight"):
        V.load_backbone(model, path)


def test_trainable_set_and_train_mode_drop_path():
    m = V.build_model(V.get_args(f"{TINY} --ffn-adapt --att-prefix".split()))
    names = V.set_trainable(m, V.get_args(f"{TINY} --ffn-adapt --att-prefix".split()))
    assert names and all(".mlp.adaptmlp." in n or ".attn.qkv_adapter." in n or n.startswith("fc.0.") for n in names)
    assert {"fc.0.weight", "fc.0.bias"} <= set(names)
    assert sum(".attn.qkv_adapter." in n for n in names) == 4 * 5 and sum(".adaptmlp." in n for n in names) == 4 * 5
    assert "fc.0.weight" not in V.set_trainable(m, V.get_args(f"{TINY} --ffn-adapt --tbl_fc False".split()))
    assert len(V.set_trainable(m, V.get_args(f"{TINY} --fulltune".split()))) == len(list(m.parameters()))
    # frozen backbone, train mode: DropPath 0.4 (the default) still acts, so two passes differ
    x = torch.randn(2, 3, 8, 32, 32)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


# ----------------------------------------------------------------------------------------------------
# sampling and cropping (spec 4.3-4.5), by hand

def test_clip_indices_by_hand():
    rng = np.random.default_rng(0)
    assert V.train_indices(10, 8, 2, rng).tolist() == [0, 2, 4, 6, 8, 8, 8, 8]
    assert V.train_indices(9, 8, 2, rng).tolist() == [0, 2, 4, 6, 6, 6, 6, 6]
    assert V.train_indices(16, 8, 2, rng).tolist() == list(range(0, 16, 2))
    starts = set()
    for _ in range(300):
        idx = V.train_indices(30, 8, 2, rng)
        assert np.array_equal(np.diff(idx), np.full(7, 2))
        starts.add(int(idx[0]))
    assert starts == set(range(15))  # uniform over [0, F - 16]
    assert V.val_indices(10, 8, 2, rng).tolist() == [0, 2, 5, 7, 9, 9, 9, 9]  # linspace(0, 10, 5), padded
    for _ in range(50):
        idx = V.val_indices(40, 8, 2, rng)
        end = idx[0] + 16
        assert 16 <= end < 40
        assert idx.tolist() == np.clip(np.linspace(end - 16, end, 8), 0, end - 1).astype(int).tolist()
    assert V.view_starts(20, 8, 4) == [0, 4, 8, 12]
    assert V.view_starts(8, 8, 4) == [0, 0, 0, 0]
    assert V.view_starts(13, 8, 4) == [0, 1, 3, 5]  # int(k * 5/3)


def test_multiscale_crop_boxes():
    h, w = 256, 340
    sides = [256, 224, 192, 168]  # int(256 * s) for s in (1, .875, .75, .66), 224 snapped to the crop size
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    expected = {(oy * ((h - ch) // 4), ox * ((w - cw) // 4), ch, cw)
                for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= 1 for ox, oy in grid}
    rng = np.random.default_rng(0)
    seen = {V.multiscale_box(h, w, 224, rng) for _ in range(3000)}
    assert seen == expected
    # the crop applies the box to every frame, then resizes
    x = torch.rand(3, 3, h, w)
    y0, x0, ch, cw = V.multiscale_box(h, w, 224, np.random.default_rng(5))
    ref = F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], (224, 224), mode="bilinear", antialias=True)
    assert torch.equal(V.multiscale_crop(x, 224, np.random.default_rng(5)), ref)


# ----------------------------------------------------------------------------------------------------
# the real data path: csv + mp4 (PyAV) + frame folders, the bad-video policy, resume, eval-only

def test_synthetic_classes_only_differ_by_motion():
    first = [V.synthetic_video(123, c)[0] for c in range(4)]
    assert all(np.array_equal(first[0], f) for f in first[1:])
    right = V.synthetic_video(123, 1)
    assert np.array_equal(right[3], np.roll(right[0], 6, axis=1))  # 2 px per frame to the right


def test_csv_pipeline_bad_videos_resume_eval_only(tmp_path, capsys):
    root = str(tmp_path / "data")
    U.write_dataset(root, counts=(8, 5, 5), folders_every=3, relative=True)
    tiny, junk = U.add_bad_entries(root, "train.csv")
    base = (f"--data-set HMDB51 --nb-classes 4 --data-path {root} {TINY} --fulltune --opt adamw --lr 1e-3 "
            f"--batch-size 4 --num-workers 0 --warmup-epochs 1 --test-num-segment 2 --test-num-crop 3 --device cpu")
    work = str(tmp_path / "work")
    with pytest.raises(UserError, match="tiny.mp4"):  # default --bad-video error: stops before training
        V.run(V.get_args(f"{base} --epochs 1 --work-dir {work}".split()))
    # skip: the <1 KB file is left out up front, the undecodable one when it is drawn; both named and logged
    V.run(V.get_args(f"{base} --epochs 2 --work-dir {work} --bad-video skip".split()))
    out = capsys.readouterr().out
    assert "tiny.mp4" in out and "junk.mp4" in out
    log = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    skipped = {v for r in log if r.get("event") == "skipped_videos" for v in r["videos"]}
    assert skipped == {tiny, junk}
    test = [r for r in log if r.get("event") == "test"][-1]
    assert test["videos"] == 5 and test["views"] == 6
    assert next(r for r in log if "lr" in r)["lr"] == 0.0  # the warmup starts at exactly 0
    ds = V.VideoDataset(V.read_split(V.get_args(f"{base}".split()), "test", print), "test",
                        V.get_args(f"{base}".split()))
    assert ds[0]["video"].shape == (6, 3, 8, 32, 32)
    # determinism, then resume: a run stopped after epoch 0 (with --warmup-epochs 1 its epoch 0 is the same
    # under --epochs 1 and --epochs 2) and resumed ends with the uninterrupted run's weights
    full = load_checkpoint(os.path.join(work, "last.pt"))
    work2 = str(tmp_path / "work2")
    V.run(V.get_args(f"{base} --epochs 2 --work-dir {work2} --bad-video skip".split()))
    again = load_checkpoint(os.path.join(work2, "last.pt"))
    assert all(torch.equal(full["model"][k], again["model"][k]) for k in full["model"])
    work3 = str(tmp_path / "work3")
    V.run(V.get_args(f"{base} --epochs 1 --work-dir {work3} --bad-video skip".split()))
    half = load_checkpoint(os.path.join(work3, "last.pt"))
    assert half["epoch"] == 0 and not all(torch.equal(full["model"][k], half["model"][k]) for k in full["model"])
    V.run(V.get_args(f"{base} --epochs 2 --work-dir {work3} --bad-video skip --resume".split()))
    resumed = load_checkpoint(os.path.join(work3, "last.pt"))
    assert resumed["epoch"] == 1
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    # eval-only on best.pt gives the final test's figures
    res = V.run(V.get_args(f"{base} --eval-only --checkpoint {work}/best.pt --work-dir {work}".split()))
    assert res["top1"] == test["top1"] and res["videos"] == 5


def test_bad_csv_lines(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for name in ("train.csv", "test.csv", "val.csv"):
        (root / name).write_text("a.mp4,1\n")
    (root / "val.csv").write_text("a.mp4,77\n")
    args = V.get_args(f"--data-set HMDB51 --data-path {root} --bad-video skip".split())
    with pytest.raises(UserError, match=r"val.csv:1: label 77 outside 0..50"):
        V.read_split(args, "test", print)
    (root / "val.csv").write_text("a.mp4 seven\n")
    with pytest.raises(UserError, match="expected 'video_path,integer_label'"):
        V.read_split(args, "test", print)
    with pytest.raises(UserError, match="needs --data-path"):
        V.read_split(V.get_args(["--data-set", "SSV2"]), "train", print)


# ----------------------------------------------------------------------------------------------------
# learning under torchrun: a tiny Video Swin tells the direction of motion; one frame cannot

def test_learns_motion_under_torchrun(tmp_path):
    work = str(tmp_path / "work")
    cmd = QUICK_START.split() + ["--synthetic-videos", "2048", "128", "257", "--work-dir", work]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "vpetl_video.py"), *cmd], check=True, env=env, cwd=ROOT, timeout=600)
    log = [json.loads(line) for line in open(os.path.join(work, "log.jsonl"))]
    test = [r for r in log if r.get("event") == "test"][-1]
    assert test["videos"] == 257 and test["views"] == 4  # every video once over the two ranks
    assert test["top1"] >= 80.0, test  # chance 25 %; a bag of frames at most 50 %
    # exact sharding: one process evaluating best.pt gives the same figures
    args = V.get_args(cmd + ["--eval-only", "--checkpoint", os.path.join(work, "best.pt")])
    res = V.run(args)
    assert res["videos"] == 257 and res["top1"] == pytest.approx(test["top1"])
    assert res["loss"] == pytest.approx(test["loss"], rel=1e-4)
    # the same model fed a single repeated frame: the classes look alike, so it is at chance
    model = V.build_model(args)
    model.load_state_dict(load_checkpoint(os.path.join(work, "best.pt"))["model"])
    model.eval()
    val = V.VideoDataset(V.read_split(args, "val", print), "val", args)
    x = torch.stack([val[i]["video"] for i in range(len(val))])
    y = torch.tensor([val[i]["label"] for i in range(len(val))])
    with torch.no_grad():
        moving = (model(x).argmax(1) == y).float().mean().item()
        static = (model(x[:, :, :1].expand_as(x)).argmax(1) == y).float().mean().item()
    print(f"quick start: test top-1 {test['top1']:.2f}; val clips moving {moving:.3f}, one frame repeated {static:.3f}")
    assert moving >= 0.8 and static <= 0.45, (moving, static)
