"""common/: the pieces every script's numbers depend on, each against a computation written here.

Stochastic depth (every backbone's), normalisation, the random-resize / crop / photometric ranges of the
train pipeline, the loss (weights, ignore convention, mean over all pixels), batch padding, sliding-window
inference, UperNet against a hand-written PPM + FPN, parameter groups and schedules, and the samplers and
seeds that decide which samples and which random draws each process gets. Tiny shapes, CPU, seconds.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist as D
from common import seg_data as S
from common.segment import EncoderDecoder, pad_batch, predict, seg_loss, slide_inference
from common.swin import SwinBlock
from common.train import custom_key_groups, init_lr, param_groups, set_lr, warmup_cosine
from common.upernet import ConvModule, FCNHead, UPerHead
from common.video_swin import SwinBlock3D
from common.vit import BEiTBlock, Block

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # mmseg's data pre-processor, RGB order (spec: ProPETL 5)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------
# stochastic depth: per sample, the whole branch, survivors scaled by 1 / keep

def check_drop_path(dp, p, n=4000):
    """A DropPath module in training drops each sample's branch whole with probability p and scales the
    survivors by 1 / (1 - p); in eval it is the identity."""
    torch.manual_seed(0)
    x = torch.rand(n, 3, 2) + 1.0  # no zeros: a zero output means dropped
    dp.train()
    y = dp(x)
    kept = (y != 0).flatten(1).any(1)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))          # dropped whole
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))              # survivors rescaled
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac                              # per sample, keep = 1 - p (4 sigma)
    dp.eval()
    assert torch.equal(dp(x), x)


@pytest.mark.parametrize("where", ["swin", "vit", "beit", "video_swin"])
def test_drop_path_of_every_backbone(where):
    p = 0.3
    blk = {"swin": lambda: SwinBlock(8, 2, window_size=2, drop_path=p),
           "vit": lambda: Block(8, 2, drop_path=p),
           "beit": lambda: BEiTBlock(8, 2, grid=2, drop_path=p),
           "video_swin": lambda: SwinBlock3D(8, 2, window_size=(2, 2, 2), drop_path=p)}[where]()
    check_drop_path(blk.drop_path, p)


# ----------------------------------------------------------------------------------------------------
# the segmentation data pipeline

def test_normalisation_is_imagenet_rgb():
    img = np.array([[[255, 0, 128], [10, 20, 30]]], np.uint8)  # (1, 2, 3) RGB
    expected = torch.tensor([[(v - m) / s for v, m, s in zip(px, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)]
                             for px in img[0]]).T[:, None, :]  # (3, 1, 2)
    torch.testing.assert_close(S.normalize(img), expected.float())
    x, _ = S.TestTransform(scale=None)(img, np.zeros((1, 2), np.uint8))
    torch.testing.assert_close(x, expected.float())
    tf = S.TrainTransform(scale=(2, 1), crop=(1, 2), ratio_range=None, flip_prob=0, photometric=False,
                          cat_max_ratio=1.0)
    x, _ = tf(img, np.zeros((1, 2), np.uint8), np.random.default_rng(0))
    torch.testing.assert_close(x, expected.float())


class Recorder:
    """Wraps a numpy Generator and records every draw: (method, arguments, result)."""

    def __init__(self, seed):
        self.rng, self.calls = np.random.default_rng(seed), []

    def __getattr__(self, name):
        fn = getattr(self.rng, name)

        def call(*args, **kw):
            out = fn(*args, **kw)
            self.calls.append((name, args, out))
            return out
        return call


def test_train_transform_defaults_are_mmseg_recipe():
    """RandomResize ratio U(0.5, 2.0) of the (long, short) bound, crop retries at cat_max_ratio 0.75, flip
    0.5, photometric distortion on: read off the resized extent of the padded output."""
    img = np.zeros((20, 40, 3), np.uint8)
    label = np.ones((20, 40), np.uint8)
    tf = S.TrainTransform(scale=(40, 20), crop=(100, 100))  # crop larger than any resize: nothing is cut
    ratios = []
    for seed in range(40):
        rng = Recorder(seed)
        _, y = tf(img, label, rng)
        r = rng.calls[0][2] * 1.5 + 0.5  # the first draw: U(0, 1) -> ratio in [0.5, 2.0)
        ratios.append(r)
        h, w = int((y != 255).any(1).sum()), int((y != 255).any(0).sum())
        f = min(int(40 * r) / 40, int(20 * r) / 20)  # mmcv rescale of (40, 20) into (int(40 r), int(20 r))
        assert (h, w) == (int(20 * f + 0.5), int(40 * f + 0.5)), (seed, r)
    assert min(ratios) < 0.7 and max(ratios) > 1.8
    assert tf.ratio_range == (0.5, 2.0) and tf.cat_max_ratio == 0.75 and tf.flip_prob == 0.5 and tf.photometric
    assert tuple(tf.mean) == IMAGENET_MEAN_RGB and tuple(tf.std) == IMAGENET_STD_RGB


def test_crop_category_check_by_hand():
    tf = S.TrainTransform()
    lab = lambda *counts: np.concatenate([np.full(n, k, np.uint8) for k, n in counts])
    assert not tf._crop_ok(lab((0, 3), (1, 1)))              # 3/4: not < 0.75, refused (mmseg: strict <)
    assert tf._crop_ok(lab((0, 2), (1, 1)))                  # 2/3
    assert tf._crop_ok(lab((0, 2), (1, 1), (255, 50)))       # ignore pixels do not count
    assert not tf._crop_ok(lab((4, 5), (255, 50)))           # one class only
    assert not tf._crop_ok(lab((255, 5)))


def test_photometric_ranges():
    """mmseg PhotoMetricDistortion: brightness U(-32, 32), contrast and saturation U(0.5, 1.5), hue
    randint(-18, 18) in OpenCV units (2 degrees each), each step with probability 1/2."""
    img = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ranges = set()
    for seed in range(30):
        rng = Recorder(seed)
        S.photometric_distortion(img, rng)
        ranges |= {(name, args) for name, args, _ in rng.calls if args != (2,)}
    assert ranges == {("uniform", (-32, 32)), ("uniform", (0.5, 1.5)), ("integers", (-18, 18))}


def test_rescale_and_resize_to_multiple_sizes():
    # ADE20K-like 500x375 (h x w) into (2048, 512): f = min(2048 / 500, 512 / 375) -> 683 x 512, rounded
    assert S.rescale_size(500, 375, (2048, 512)) == (683, 512)
    assert S.rescale_size(333, 500, (2048, 512)) == (512, 769)  # 768.8 rounds up
    img = np.zeros((33, 65, 3), np.uint8)
    x, _ = S.TestTransform(scale=None, size_divisor=32)(img, np.zeros((33, 65), np.uint8))
    assert tuple(x.shape[1:]) == (64, 96)  # each side up to a multiple of 32
    tf = S.TestTransform(scale=(2048, 512), size_divisor=32)
    x, _ = tf(np.zeros((333, 500, 3), np.uint8), np.zeros((333, 500), np.uint8))
    assert tuple(x.shape[1:]) == tf.output_size(333, 500) == (512, 800)


def test_cityscapes_train_ids_are_cityscapes_scripts():
    # cityscapesScripts helpers/labels.py: name -> (id, trainId), written out here
    table = {"road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
             "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
             "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13),
             "truck": (27, 14), "bus": (28, 15), "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18)}
    assert S.CITYSCAPES_ID_TO_TRAINID == dict(table.values())


# ----------------------------------------------------------------------------------------------------
# loss, padding, inference

def test_seg_loss_mean_over_all_pixels_ignored_as_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 8, 8))
    label[0, :3] = 255
    label[1, :, :5] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)  # mmseg resize
    logp = up.log_softmax(1)
    total = 0.0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if label[b, i, j] != 255:
                    total -= logp[b, label[b, i, j], i, j].item()
    assert seg_loss(logits, label).item() == pytest.approx(total / (2 * 8 * 8), rel=1e-5)  # all 128 pixels
    assert seg_loss(logits, torch.full((2, 8, 8), 255)).item() == 0.0


class Heads(nn.Module):
    def __init__(self, cin, k, in_index):
        super().__init__()
        self.conv, self.in_index = nn.Conv2d(cin, k, 1), in_index

    def forward(self, feats):
        return self.conv(feats[self.in_index])


class TwoMaps(nn.Module):
    def forward(self, x):
        return [x, F.avg_pool2d(x, 2)]


def test_segmentor_losses_and_their_weights():
    torch.manual_seed(0)
    model = EncoderDecoder(TwoMaps(), Heads(3, 4, 0), Heads(3, 4, 1), aux_weight=0.4)
    img, label = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
    label[:, 0] = 255
    total, parts = model(img, label)
    dec = seg_loss(model.decode_head.conv(img), label)
    aux = seg_loss(model.auxiliary_head.conv(F.avg_pool2d(img, 2)), label)
    torch.testing.assert_close(parts["loss_decode"], dec)
    torch.testing.assert_close(parts["loss_aux"], 0.4 * aux)
    torch.testing.assert_close(total, dec + 0.4 * aux)
    # inference: the decode head's logits resized to the input
    torch.testing.assert_close(model(img), model.decode_head.conv(img))


def test_pad_batch_pads_image_zero_and_label_ignore():
    img, label = torch.randn(2, 3, 3, 4), torch.randint(0, 5, (2, 3, 4))
    pi, pl = pad_batch(img, label, (5, 6))
    assert pi.shape == (2, 3, 5, 6) and pl.shape == (2, 5, 6)
    assert torch.equal(pi[..., :3, :4], img) and torch.equal(pl[..., :3, :4], label)
    assert (pi[..., 3:, :] == 0).all() and (pi[..., 4:] == 0).all()
    assert (pl[:, 3:] == 255).all() and (pl[..., 4:] == 255).all()
    same = pad_batch(img, label, (3, 4))
    assert torch.equal(same[0], img) and torch.equal(same[1], label)


class WindowLog(nn.Module):
    """Records each window's box (read from coordinate channels) and answers a constant per call."""

    def __init__(self, k):
        super().__init__()
        self.k, self.boxes = k, []

    def forward(self, win):
        y, x = int(win[0, 0, 0, 0]), int(win[0, 1, 0, 0])
        self.boxes.append((y, x, win.shape[2], win.shape[3]))
        return torch.full((win.shape[0], self.k, win.shape[2], win.shape[3]), float(len(self.boxes)))


@pytest.mark.parametrize("h,w,crop,stride", [(11, 13, (4, 5), (3, 3)), (10, 9, (4, 4), (3, 2)), (3, 7, (4, 4), (2, 2))])
def test_slide_inference_windows_and_average(h, w, crop, stride):
    """mmseg: ceil((L - crop) / stride) + 1 windows per axis, the last one moved back to end at the border
    (full crop size unless the image is smaller), logits averaged over the windows covering a pixel."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([ys, xs, torch.zeros_like(ys)]).float()[None]  # channel 0 = row, 1 = column
    model = WindowLog(2)
    out = slide_inference(model, img, 2, crop, stride)
    (hc, wc), (hs, ws) = crop, stride
    starts = lambda n, c, s: [min(i * s, max(n - c, 0)) for i in range(math.ceil(max(n - c, 0) / s) + 1)]
    expected = [(y, x, min(hc, h), min(wc, w)) for y in starts(h, hc, hs) for x in starts(w, wc, ws)]
    assert model.boxes == expected
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for v, (y, x, bh, bw) in enumerate(expected, 1):
        total[y:y + bh, x:x + bw] += v
        count[y:y + bh, x:x + bw] += 1
    assert (count > 0).all()
    torch.testing.assert_close(out, (total / count).expand(1, 2, h, w))


def test_predict_resizes_logits_then_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5) * 3
    probs = predict(nn.Identity(), logits, (9, 11), 3)
    ref = F.interpolate(logits, size=(9, 11), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(probs, ref)


# ----------------------------------------------------------------------------------------------------
# UperNet, written out with functional calls

def conv_bn_relu(m, x):
    """mmcv ConvModule in eval: conv (no bias), BN with running statistics, ReLU."""
    y = F.conv2d(x, m.conv.weight, None, padding=m.conv.padding)
    bn = m.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_upernet_equals_hand_written_ppm_fpn():
    torch.manual_seed(0)
    cins, ch, k = (4, 6, 8, 10), 8, 5
    head = UPerHead(cins, ch, k, pool_scales=(1, 2, 3, 6)).eval()
    randomise_bn(head, 1)
    nn.init.normal_(head.conv_seg.weight)
    sizes = [(24, 20), (12, 10), (6, 5), (3, 3)]  # the last not exactly half: resizes by size, not factor
    feats = [torch.randn(2, c, *s) for c, s in zip(cins, sizes)]
    with torch.no_grad():
        f4 = feats[3]
        pooled = [up(conv_bn_relu(m[1], F.adaptive_avg_pool2d(f4, s)), sizes[3])
                  for m, s in zip(head.psp_modules, (1, 2, 3, 6))]
        p4 = conv_bn_relu(head.bottleneck, torch.cat([f4] + pooled, 1))          # PPM: input first
        l3 = conv_bn_relu(head.lateral_convs[2], feats[2]) + up(p4, sizes[2])    # top-down, accumulated
        l2 = conv_bn_relu(head.lateral_convs[1], feats[1]) + up(l3, sizes[1])
        l1 = conv_bn_relu(head.lateral_convs[0], feats[0]) + up(l2, sizes[0])
        outs = [conv_bn_relu(head.fpn_convs[0], l1), conv_bn_relu(head.fpn_convs[1], l2),
                conv_bn_relu(head.fpn_convs[2], l3), p4]                         # the PPM output as it is
        fused = torch.cat([outs[0]] + [up(o, sizes[0]) for o in outs[1:]], 1)
        ref = F.conv2d(conv_bn_relu(head.fpn_bottleneck, fused), head.conv_seg.weight, head.conv_seg.bias)
        torch.testing.assert_close(head(feats), ref, rtol=1e-4, atol=1e-5)
        aux = FCNHead(8, 6, k).eval()
        randomise_bn(aux, 2)
        ref = F.conv2d(conv_bn_relu(aux.convs[0], feats[2]), aux.conv_seg.weight, aux.conv_seg.bias)
        torch.testing.assert_close(aux(feats), ref)


def test_head_init_is_mmcv():
    torch.manual_seed(0)
    m = ConvModule(64, 256, 3, padding=1)
    std = m.conv.weight.std().item()
    assert abs(std - math.sqrt(2 / (9 * 256))) < 0.03 * math.sqrt(2 / (9 * 256))  # kaiming fan_out, relu
    assert torch.equal(m.bn.weight, torch.ones(256)) and torch.equal(m.bn.bias, torch.zeros(256))
    head = UPerHead((64, 64, 64, 64), 64, 150)
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.0005 and not head.conv_seg.bias.any()


# ----------------------------------------------------------------------------------------------------
# optimiser groups and schedules

class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(3))
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.norm0 = nn.LayerNorm(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_and_lr_scale():
    keys = ("absolute_pos_embed", "relative_position_bias_table", "norm")
    groups = param_groups(Named(), 0.05, keys, lr_scale=lambda n: 2.0 if n.startswith("conv") else 1.0)
    where = {n: g for g in groups for n in g["names"]}
    assert set(where) == {"absolute_pos_embed", "attn.relative_position_bias_table", "norm0.weight", "norm0.bias",
                          "conv.weight", "conv.bias", "bn.weight", "bn.bias"}  # frozen ones left out
    for n in ("absolute_pos_embed", "attn.relative_position_bias_table", "norm0.weight", "norm0.bias"):
        assert where[n]["weight_decay"] == 0.0, n
    for n in ("conv.weight", "conv.bias", "bn.weight", "bn.bias"):  # 'bn' is not 'norm': decayed (mmengine)
        assert where[n]["weight_decay"] == 0.05, n
    assert where["conv.weight"]["lr_scale"] == 2.0 and where["bn.bias"]["lr_scale"] == 1.0
    opt = torch.optim.AdamW(groups, lr=1.0)
    init_lr(opt, 1e-3)
    set_lr(opt, 0.5)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["conv.weight"] == pytest.approx(1e-3) and lrs["bn.weight"] == pytest.approx(5e-4)


def test_custom_keys_longest_first_then_by_name():
    """mmcv custom_keys: the longest key contained in the name wins; of two keys of one length, the first by
    name; a key's missing multiplier is 1; frozen parameters are left out."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.decode_head = nn.ModuleDict({"norm": nn.LayerNorm(2), "conv": nn.Conv2d(2, 2, 1)})
            self.interactions = nn.ModuleDict({"query_norm": nn.LayerNorm(2)})
            self.norm1 = nn.LayerNorm(2)
            self.fc = nn.Linear(2, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)
    keys = {"head": dict(lr_mult=10.0), "norm": dict(decay_mult=0.0), "interactions": dict(lr_mult=5.0)}
    where = {n: (g["lr_scale"], g["weight_decay"]) for g in custom_key_groups(M(), 0.01, keys) for n in g["names"]}
    assert not any(n.startswith("frozen") for n in where)
    assert where["decode_head.norm.weight"] == (10.0, 0.01)       # 'head' and 'norm' tie: 'head' by name
    assert where["decode_head.conv.weight"] == (10.0, 0.01)
    assert where["interactions.query_norm.bias"] == (5.0, 0.01)   # 'interactions' is longer than 'norm'
    assert where["norm1.weight"] == (1.0, 0.0) and where["fc.bias"] == (1.0, 0.01)


def test_cosine_schedule_with_a_min_lr():
    assert warmup_cosine(5, 70, 10, 0.1) == pytest.approx(0.5)            # warmup from 0, min unused
    assert warmup_cosine(10, 70, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(40, 70, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(70, 70, 10, 0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------------
# who sees which sample, and which random numbers

@pytest.mark.parametrize("n,world", [(12, 3), (8, 2), (2, 4)])
def test_training_sampler_shards_the_epoch(n, world):
    streams = []
    for rank in range(world):
        it = iter(D.InfiniteSampler(n, rank, world, seed=5))
        streams.append([next(it) for _ in range(3 * max(1, n // world))])
    per_epoch = max(1, n // world) if n >= world else n
    if n >= world:  # each epoch: the ranks' shards are disjoint and cover the dataset
        for e in range(3):
            seen = [i for s in streams for i, _ in s[e * per_epoch:(e + 1) * per_epoch]]
            assert sorted(seen) == list(range(n)), (e, seen)
        first = [i for i, _ in streams[0][:per_epoch]]
        second = [i for i, _ in streams[0][per_epoch:2 * per_epoch]]
        assert first != second or n // world == 1  # a new order each epoch
    seeds = [s for stream in streams for _, s in stream]
    assert len(set(seeds)) == len(seeds)  # every (rank, position) augments with its own seed


def test_epoch_orders_differ():
    it = iter(D.InfiniteSampler(20, 0, 1, seed=0))
    epochs = [[next(it)[0] for _ in range(20)] for _ in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_step_seed_depends_on_seed_iteration_and_rank():
    def draw(seed, it, rank):
        D.seed_step(seed, it, rank)
        return torch.rand(4)
    a = draw(0, 5, 0)
    assert torch.equal(a, draw(0, 5, 0))
    for other in ((0, 5, 1), (0, 6, 0), (1, 5, 0)):
        assert not torch.equal(a, draw(*other)), other
