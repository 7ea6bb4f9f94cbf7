"""vpetl_video.py against its spec (shared/papers/vpetl.md): the README recipe and main.py's defaults as
the command line's defaults (sections 1.1, 2, 3), the built Swin-B (stochastic depth per block, adapter
and PATT sizes), the block with adapter and PATT against its formula with stochastic depth acting, the
learning rate from the TOTAL batch under two processes, the multi-view test as the mean of the views'
logits, the epoch sampler's shards, the normalisation and the validation / test crops by hand.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import vpetl_video as V
from common import dist as D

TINY = "--model swin_tiny --embed-dim 16 --depths 1 1 2 1 --num-heads 1 2 2 4 --input-size 32 --window-size 8 4 4"


def test_defaults_are_the_readme_recipe():
    """Spec 3 (README command + main.py): 8 frames at stride 2, 224 crops, 4 x 3 test views; Swin-B window
    (8, 7, 7), drop path 0.4; adapter 64 / scale 0.1; PATT kv, m = 128, s = 0.8 (README); SGD momentum 0.9,
    blr 0.1, weight decay 0, 70 epochs, 10 warmup, batch 16 per process, min lr 0; the head trains."""
    a = V.get_args([])
    keys = ("num_frames", "sampling_rate", "input_size", "short_side_size", "test_num_segment", "test_num_crop", "model",
            "window_size", "drop_path", "ffn_num", "ffn_scale", "att_prefix_mode", "att_mid_dim", "att_prefix_scale",
            "opt", "momentum", "blr", "lr", "weight_decay", "min_lr", "epochs", "warmup_epochs", "batch_size", "tbl_fc",
            "fulltune", "patt_zero_init")
    got = {k: getattr(a, k) for k in keys}
    assert got == dict(num_frames=8, sampling_rate=2, input_size=224, short_side_size=224, test_num_segment=4,
                       test_num_crop=3, model="swin_base", window_size=[8, 7, 7], drop_path=0.4, ffn_num=64,
                       ffn_scale=0.1, att_prefix_mode="patt_kv", att_mid_dim=128, att_prefix_scale=0.8, opt="sgd",
                       momentum=0.9, blr=0.1, lr=None, weight_decay=0.0, min_lr=0.0, epochs=70, warmup_epochs=10,
                       batch_size=16, tbl_fc=True, fulltune=False, patt_zero_init=False)
    assert {k: V.get_args(["--data-set", k]).nb_classes for k in ("HMDB51", "SSV2", "UCF101", "K400")} == \
           {"HMDB51": 51, "SSV2": 174, "UCF101": 101, "K400": 400}
    assert V.ARCHS["swin_base"] == dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


def test_swin_b_structure():
    """Spec 1.1 / 2.1 / 2.2: 24 blocks with drop path linspace(0, 0.4, 24); in every block the adapter
    C -> 64 -> C scaled 0.1 and PATT C -> 128 -> 2C (k and v) scaled 0.8; a fresh Conv3d head."""
    a = V.get_args("--data-set HMDB51 --ffn-adapt --att-prefix".split())
    with torch.device("meta"):
        model = V.build_model(a)
    blocks = [b for layer in model.backbone.layers for b in layer.blocks]
    assert len(blocks) == 24
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.4 * i / 23 for i in range(24)])
    for b, c in zip((blocks[0], blocks[2], blocks[4], blocks[23]), (128, 256, 512, 1024)):
        ad, patt = b.mlp.adaptmlp, b.attn
        assert (ad.down_proj.in_features, ad.down_proj.out_features, ad.up_proj.out_features, ad.scale) == \
               (c, 64, c, 0.1)
        assert (patt.qkv_adapter[0].out_features, patt.qkv_adapter[2].out_features) == (128, 2 * c)
        assert (patt.targets, patt.patt_scale) == ("kv", 0.8)
    head = model.fc[0]
    assert isinstance(head, nn.Conv3d) and head.kernel_size == (1, 1, 1) and head.out_channels == 51


class ScriptedDropPath(nn.Module):
    """Sample 0's branch dropped, sample 1's kept and scaled 1 / 0.6 (DropPath in training, scripted)."""

    def forward(self, x):
        return x * torch.tensor([0.0, 1 / 0.6]).view(2, 1, 1, 1, 1)


def test_block_with_adapter_and_patt_under_stochastic_depth():
    """Spec 1.3 / 2.1: x1 = x + DP(W-MSA(LN1 x)); h = LN2(x1); out = x1 + DP(fc2(GELU(fc1 h)) + 0.1 Up(ReLU(Down h))):
    the adapter sits inside the MLP branch, so the same DropPath acts on it (unlike ProPETL's)."""
    torch.manual_seed(0)
    model = V.build_model(V.get_args(f"{TINY} --ffn-adapt --att-prefix".split()))
    blk = model.backbone.layers[2].blocks[1]  # shifted windows, C = 64
    for p in blk.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    blk.drop_path = ScriptedDropPath()
    x = torch.randn(2, 4, 8, 8, 64)  # (B, D, H, W, C)
    m = torch.tensor([0.0, 1 / 0.6]).view(2, 1, 1, 1, 1)
    with torch.no_grad():
        x1 = x + m * blk.window_attention(blk.norm1(x))
        h = blk.norm2(x1)
        mlp = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        ad = blk.mlp.adaptmlp
        ada = 0.1 * F.linear(F.relu(F.linear(h, ad.down_proj.weight, ad.down_proj.bias)), ad.up_proj.weight,
                             ad.up_proj.bias)
        torch.testing.assert_close(blk(x), x1 + m * (mlp + ada))


# ----------------------------------------------------------------------------------------------------
# the learning rate and the evaluation

class Stop(Exception):
    pass


def test_lr_scales_with_the_total_batch(tmp_path, monkeypatch):
    """lr = blr x (batch per process x processes) / 256 (spec 3): run() under a 2-process DistInfo, stopped
    where the optimiser gets its learning rate."""
    seen = {}

    def capture(optimizer, lr):
        seen.update(optimizer=optimizer, lr=lr)
        raise Stop

    monkeypatch.setattr(V.D, "setup", lambda device="auto": D.DistInfo(0, 0, 2, torch.device("cpu")))
    monkeypatch.setattr(V, "init_lr", capture)
    args = V.get_args(f"{TINY} --ffn-adapt --batch-size 4 --num-workers 0 --synthetic-videos 16 4 4 "
                      f"--work-dir {tmp_path}".split())
    with pytest.raises(Stop):
        V.run(args)
    assert seen["lr"] == pytest.approx(0.1 * 4 * 2 / 256)
    opt = seen["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert {(g["momentum"], g["weight_decay"], g["nesterov"]) for g in opt.param_groups} == {(0.9, 0.0, False)}


class Views(nn.Module):
    """A 'model' whose logits are its input (B * V, K, 1, 1, 1) -> (B * V, K)."""

    def forward(self, x):
        return x.flatten(1)


def test_multi_view_test_averages_the_views_logits():
    """Spec 3: the views' logits are averaged per video before top-1 / top-5 and the loss."""
    k = 7
    logits = torch.zeros(2, 3, k)  # (videos, views, classes)
    logits[0, 0, 1], logits[0, 1, 0], logits[0, 2, 0] = 3.0, 5.0, 5.0  # view 0 says 1, the mean says 0
    logits[1, :, 2] = torch.tensor([1.0, 2.0, 4.0])
    logits[1, 0, 6] = 1.5  # ... and the runner-up of video 1 differs between view 0 and the mean
    y = torch.tensor([0, 6])
    batch = {"video": logits[..., None, None, None], "label": y, "bad": []}  # (B, V, K, 1, 1, 1)
    args = V.get_args(["--nb-classes", str(k), "--data-set", "HMDB51"])
    info = D.DistInfo(0, 0, 1, torch.device("cpu"))
    res = V.evaluate(Views(), [batch], args, info, lambda **kw: None, "test")
    mean = logits.mean(1)
    assert res["top1"] == 50.0  # video 0 right, video 1 wrong (class 6 is not its argmax)
    top5 = [y[i].item() in mean[i].topk(5).indices.tolist() for i in range(2)]
    assert res["top5"] == 100.0 * sum(top5) / 2
    assert res["loss"] == pytest.approx(F.cross_entropy(mean, y).item(), rel=1e-6)
    assert res["videos"] == 2


def test_epoch_sampler_shards_and_reshuffles():
    """DistributedSampler(shuffle) order: per epoch the ranks' shards are disjoint and cover the data
    (padded to a multiple of the world size); a new order every epoch."""
    n, world = 10, 3
    shards = []
    for rank in range(world):
        s = V.EpochSampler(n, rank, world, seed=0)
        s.set_epoch(0)
        shards.append([i for i, _ in s])
    assert all(len(sh) == 4 for sh in shards)
    flat = sum(shards, [])
    assert set(flat) == set(range(n)) and len(flat) == 12  # two padded duplicates
    s = V.EpochSampler(n, 0, 1, seed=0)
    orders = []
    for e in range(3):
        s.set_epoch(e)
        orders.append([i for i, _ in s])
    assert orders[0] != orders[1] != orders[2]
    seeds = [sd for rank in range(world) for _, sd in V.EpochSampler(n, rank, world, seed=0)]
    assert len(set(seeds)) == len(seeds)


# ----------------------------------------------------------------------------------------------------
# normalisation and crops

def test_video_normalisation_imagenet_rgb():
    x = torch.tensor([255.0, 0.0, 128.0]).view(1, 3, 1, 1).expand(2, 3, 1, 2)  # (T, 3, H, W)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 0, 128), mean, std)]).view(3, 1, 1, 1)
    torch.testing.assert_close(V.normalize(x), expected.expand(3, 2, 1, 2))


def test_validation_and_test_crops(tmp_path):
    """Validation: short side resized (here already at the size), centre crop (spec 4.4). Test: frames at the
    sampling stride, 4 temporal clips x 3 crops left / centre / right along the long side (spec 4.5, our
    real-crop choice), centred across."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (20, 40, 56, 3), dtype=np.uint8)
    folder = tmp_path / "video"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"img_{i + 1:05d}.png")
    args = V.get_args(f"{TINY} --short-side-size 40".split())
    ds = V.VideoDataset([(str(folder), 0)], "val", args)
    idx = V.val_indices(20, 8, 2, np.random.default_rng(123))
    x = V.to_float(frames[idx])  # (8, 3, 40, 56)
    torch.testing.assert_close(ds[(0, 123)]["video"], V.normalize(x[..., 4:36, 12:44]))
    ds = V.VideoDataset([(str(folder), 0)], "test", args)
    views = ds[(0, 0)]["video"]
    clips = V.to_float(frames[0::2])  # 10 frames at stride 2
    starts = [0, 0, 1, 2]  # int(k * (10 - 8) / 3)
    expected = [V.normalize(clips[t:t + 8, :, 4:36, s:s + 32]) for t in starts for s in (0, 12, 24)]
    torch.testing.assert_close(views, torch.stack(expected))


def test_loop_sets_the_schedule_every_iteration(tmp_path, monkeypatch):
    """Spec 3: the lr follows warmup-then-cosine at the fractional epoch e = epoch + it / iterations, set before
    every iteration (4 iterations per epoch here, 1 warmup epoch: factors 0, 1/4, 1/2 for the first three)."""
    factors = []
    real = V.set_lr

    def record(optimizer, factor):
        factors.append(factor)
        if len(factors) == 3:
            raise Stop
        real(optimizer, factor)

    monkeypatch.setattr(V, "set_lr", record)
    args = V.get_args(f"{TINY} --fulltune --batch-size 4 --num-workers 0 --synthetic-videos 16 4 4 --epochs 3 "
                      f"--warmup-epochs 1 --device cpu --work-dir {tmp_path}".split())
    with pytest.raises(Stop):
        V.run(args)
    assert factors == pytest.approx([0.0, 0.25, 0.5])
