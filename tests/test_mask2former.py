"""common/mask2former.py: the Hungarian matcher against brute force, its cost and the losses by hand, point
sampling and the uncertainty sampler, the masked-attention mask (resize, threshold, fully-blocked rows) and
its wiring per decoder layer, the sine position, ToMask targets and semantic inference by hand."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import common.mask2former as M


def tiny_head(num_classes=5, **kw):
    """64 wide, 4 heads, 2 encoder and 3 decoder layers, 8 queries, 256 points: a few ms per call."""
    cfg = dict(dim=64, num_queries=8, heads=4, enc_ffn=64, dec_ffn=64, enc_layers=2, dec_layers=3, num_points=256)
    cfg.update(kw)
    return M.Mask2FormerHead([32, 32, 32, 32], num_classes, **cfg)


def feats(b=2, size=64, c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]


# ----------------------------------------------------------------------------------------------------
# matching

@pytest.mark.parametrize("q,n", [(3, 3), (4, 2), (5, 3), (6, 4), (7, 1)])
def test_hungarian_matches_brute_force(q, n):
    g = torch.Generator().manual_seed(q * 10 + n)
    for _ in range(5):
        cost = torch.randn(q, n, generator=g)
        rows, cols = M.hungarian(cost)
        assert rows.tolist() == sorted(rows.tolist()) and len(set(rows.tolist())) == n
        assert sorted(cols.tolist()) == list(range(n))  # every target gets exactly one query
        best = min(sum(cost[perm[j], j].item() for j in range(n)) for perm in itertools.permutations(range(q), n))
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-6)


def test_match_cost_by_hand():
    ln3 = math.log(3)
    cls = torch.tensor([[0.0, ln3, 0.0], [ln3, 0.0, 0.0]])  # softmax rows: (1/5, 3/5, 1/5), (3/5, 1/5, 1/5)
    masks = torch.tensor([[0.0, 0.0], [ln3, -ln3]])  # sigmoid rows: (1/2, 1/2), (3/4, 1/4)
    gt_labels = torch.tensor([1])
    gt_points = torch.tensor([[1.0, 0.0]])
    cost = M.match_cost(cls, masks, gt_labels, gt_points)
    # query 0: class -3/5; BCE(0, 1) = BCE(0, 0) = ln 2; dice 1 - (2 * 1/2 + 1) / (1 + 1 + 1) = 1/3
    q0 = 2 * (-3 / 5) + 5 * math.log(2) + 5 / 3
    # query 1: class -1/5; BCE(ln 3, 1) = BCE(-ln 3, 0) = ln(4/3); dice 1 - (2 * 3/4 + 1) / (1 + 1 + 1) = 1/6
    q1 = 2 * (-1 / 5) + 5 * math.log(4 / 3) + 5 / 6
    torch.testing.assert_close(cost, torch.tensor([[q0], [q1]]))


# ----------------------------------------------------------------------------------------------------
# points

def test_point_sample_is_bilinear_at_pixel_centres():
    x = torch.tensor([[[[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]]])  # (1, 1, H=2, W=3)
    pts = torch.tensor([[[0.5 / 3, 0.5 / 2],    # centre of (0, 0)
                         [2.5 / 3, 1.5 / 2],    # centre of (1, 2)
                         [1.0 / 3, 0.5 / 2],    # half way between (0, 0) and (0, 1)
                         [1.5 / 3, 0.5],        # half way between (0, 1) and (1, 1)
                         [0.0, 0.5 / 2]]])      # the left border: half the pixel, half the zero padding
    out = M.point_sample(x, pts)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 32.0, 1.5, 9.0, 0.5]]]))


def test_uncertain_point_coords():
    # logits 10 (certain) everywhere but a band of 0 (uncertain) over the columns x < 3 of 8
    logits = torch.full((2, 1, 8, 8), 10.0)
    logits[:, :, :, :3] = 0.0
    logits[1] *= -1  # the sign does not matter, |logit| does
    torch.manual_seed(5)
    coords = M.uncertain_point_coords(logits, 40, oversample_ratio=3.0, importance_ratio=0.75)
    assert coords.shape == (2, 40, 2)
    # the 30 importance points come from the band (and the half pixel where it blends into 10)
    assert (coords[:, :30, 0] < 3.5 / 8).all()
    # exactly: the 30 candidates of largest -|logit| out of 120 uniform ones, then 10 uniform points
    torch.manual_seed(5)
    cand = torch.rand(2, 120, 2)
    rest = torch.rand(2, 10, 2)
    unc = -M.point_sample(logits, cand)[:, 0].abs()
    for i in range(2):
        picked = cand[i, unc[i].topk(30).indices]
        torch.testing.assert_close(coords[i, :30], picked)
    torch.testing.assert_close(coords[:, 30:], rest)


# ----------------------------------------------------------------------------------------------------
# targets, positions, attention mask

def test_semantic_targets_one_mask_per_present_class():
    label = torch.tensor([[[3, 3, 255], [0, 3, 255]], [[255, 255, 255], [255, 255, 255]]])
    (c0, m0), (c1, m1) = M.semantic_targets(label)
    assert c0.tolist() == [0, 3]
    torch.testing.assert_close(m0, torch.tensor([[[0.0, 0, 0], [1, 0, 0]], [[1.0, 1, 0], [0, 1, 0]]]))
    assert c1.numel() == 0 and m1.shape == (0, 2, 3)  # a fully ignored crop: no target


def test_sine_position_by_hand():
    h, w, nf = 3, 4, 6
    pos = M.sine_position(h, w, nf)
    assert pos.shape == (1, 12, 3, 4)
    s = 2 * math.pi
    y, x = 1, 2
    ay, ax = (y + 1) / (h + 1e-6) * s, (x + 1) / (w + 1e-6) * s
    # channel 2k: sin(a / 10000^(2k/nf)), channel 2k+1: cos of the same; y half first
    for k in range(3):
        f = 10000 ** (2 * k / nf)
        assert pos[0, 2 * k, y, x].item() == pytest.approx(math.sin(ay / f), abs=1e-6)
        assert pos[0, 2 * k + 1, y, x].item() == pytest.approx(math.cos(ay / f), abs=1e-6)
        assert pos[0, nf + 2 * k, y, x].item() == pytest.approx(math.sin(ax / f), abs=1e-6)
        assert pos[0, nf + 2 * k + 1, y, x].item() == pytest.approx(math.cos(ax / f), abs=1e-6)


def test_attention_mask_by_hand():
    # 1 image, 2 queries, a 2x2 mask resized to 1x2: the one output row samples source y = 0.5, the mean of
    # the two rows, so each column's mean. Query 0 has a negative and a positive column; query 1 two negative
    # columns: fully blocked, hence opened entirely.
    mask = torch.tensor([[[[-1.0, 2.0], [-3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])
    blocked = M.attention_mask(mask, (1, 2), heads=3)
    assert blocked.shape == (3, 2, 2)
    for h in range(3):
        assert blocked[h].tolist() == [[True, False], [False, False]]


def test_decoder_layers_get_the_previous_prediction_as_mask():
    torch.manual_seed(0)
    head = tiny_head(dec_layers=4).eval()
    # shift the 8 queries' mask logits from +3 to -6 so that rows open, partly and fully blocked all occur
    predict = head._predict
    shift = torch.linspace(-3, 6, 8).view(1, 8, 1, 1)
    head._predict = lambda q, mask_feature: (lambda c, m: (c, m - shift))(*predict(q, mask_feature))
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args)) for layer in
             head.transformer_decoder.layers]
    x = feats()
    with torch.no_grad():
        all_cls, all_mask = head(x)
        _, memories = head.pixel_decoder(x)
    for h in hooks:
        h.remove()
    assert len(all_cls) == len(all_mask) == 5  # before the first layer and after each of the 4
    assert [m.shape[-2:] for m in memories] == [(2, 2), (4, 4), (8, 8)]
    assert all_mask[0].shape == (2, 8, 16, 16) and all_cls[0].shape == (2, 8, 6)
    for i, (q, q_pos, mem, mem_pos, blocked) in enumerate(seen):
        lvl = i % 3  # coarsest first, round robin: 2x2, 4x4, 8x8, 2x2
        assert mem.shape == (2, memories[lvl].shape[-1] ** 2, 64)
        assert torch.equal(blocked, M.attention_mask(all_mask[i], memories[lvl].shape[-2:], 4))
        small = F.interpolate(all_mask[i], memories[lvl].shape[-2:], mode="bilinear", align_corners=False) < 0
        full = small.flatten(2).all(-1)  # (B, Q) fully blocked rows, opened in the mask
        assert full.any() and (small.flatten(2).any(-1) & ~full).any()  # the case the rule is for, and the other
        assert not blocked.view(2, 4, 8, -1)[:, 0][full].any()

# ----------------------------------------------------------------------------------------------------
# inference and losses

def test_semantic_inference_by_hand():
    ln2, ln3 = math.log(2), math.log(3)
    cls = torch.tensor([[[ln2, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # softmax: (1/2, 1/4 | 1/4), (1/3, 1/3 | 1/3)
    mask = torch.tensor([[[[0.0, ln3]], [[-ln3, 0.0]]]])  # sigmoid: (1/2, 3/4), (1/4, 1/2); (1, 2, 1, 2)
    out = M.semantic_inference(cls, mask)
    ref = torch.tensor([[[[1 / 2 * 1 / 2 + 1 / 3 * 1 / 4, 1 / 2 * 3 / 4 + 1 / 3 * 1 / 2]],
                         [[1 / 4 * 1 / 2 + 1 / 3 * 1 / 4, 1 / 4 * 3 / 4 + 1 / 3 * 1 / 2]]]])
    torch.testing.assert_close(out, ref)


def test_segmentor_inference_is_the_last_prediction_resized():
    torch.manual_seed(0)
    head = tiny_head()
    x = feats(b=1)

    class Fixed(torch.nn.Module):  # stands in for a backbone: the same 4 maps for any image
        def forward(self, img):
            return x
    seg = M.Mask2FormerSegmentor(Fixed(), head).eval()
    img = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        out = seg(img)
        all_cls, all_mask = head(x)
    ref = F.interpolate(M.semantic_inference(all_cls[-1], all_mask[-1]), (64, 64), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(out, ref)


def test_losses_cover_every_prediction(monkeypatch):
    head = tiny_head(dec_layers=3)
    calls = []

    def fake(cls, mask, targets):
        calls.append(cls.shape)
        i = len(calls)
        return torch.tensor(1.0 * i), torch.tensor(10.0 * i), torch.tensor(100.0 * i)
    monkeypatch.setattr(head, "loss_single", fake)
    total, parts = head.losses(feats(), torch.zeros(2, 64, 64, dtype=torch.long))
    assert len(calls) == 4
    assert (parts["loss_cls"].item(), parts["loss_mask"].item(), parts["loss_dice"].item()) == (4, 40, 400)
    assert parts["loss_deep"].item() == 111 * (1 + 2 + 3) and total.item() == 111 * 10


def test_loss_single_by_hand():
    # 2 queries, classes 0..2 (+ no-object 3); the image is all class 1. Query 0 is confident in class 1 and
    # gets matched; query 1 becomes no-object (weight 0.1). Mask logits 0: the BCE is ln 2 at any point.
    torch.manual_seed(0)
    head = tiny_head(num_classes=3, num_points=1024)
    cls = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.zeros(1, 2, 16, 16, requires_grad=True)
    targets = M.semantic_targets(torch.ones(1, 64, 64, dtype=torch.long))
    loss_cls, loss_mask, loss_dice = head.loss_single(cls, mask, targets)
    ce0 = math.log(math.exp(5) + 3) - 5
    ce1 = math.log(4)
    assert loss_cls.item() == pytest.approx(2 * (1.0 * ce0 + 0.1 * ce1) / 1.1, rel=1e-6)
    assert loss_mask.item() == pytest.approx(5 * math.log(2), rel=1e-6)
    # dice with s = 1/2 and targets ~1 (points within half a pixel of the border blend with the zero padding):
    # 1 - (sum t + 1) / (P/2 + sum t + 1) lies between 1/3 (all t = 1) and 0.338 (t = 0.98)
    assert 5 / 3 - 1e-3 < loss_dice.item() < 5 * 0.338
    (loss_mask + loss_dice).backward()
    assert mask.grad[0, 1].abs().sum() == 0 and mask.grad[0, 0].abs().sum() > 0  # only the matched query
    # no target at all (a fully ignored crop): every query is no-object, mask losses 0 but in the graph
    empty = M.semantic_targets(torch.full((1, 64, 64), 255))
    loss_cls, loss_mask, loss_dice = head.loss_single(cls, mask, empty)
    ce0_no_object = math.log(math.exp(5) + 3)  # query 0's no-object logit is 0
    assert loss_cls.item() == pytest.approx(2 * (0.1 * ce0_no_object + 0.1 * ce1) / 0.2, rel=1e-6)
    assert loss_mask.item() == 0 and loss_dice.requires_grad


def test_training_step_gives_gradients_everywhere():
    # DDP needs every parameter in the graph: one loss, every parameter gets a gradient
    torch.manual_seed(0)
    head = tiny_head()
    label = torch.randint(0, 5, (2, 64, 64))
    label[0, :20] = 255
    total, parts = head.losses(feats(), label)
    total.backward()
    assert set(parts) == {"loss_cls", "loss_mask", "loss_dice", "loss_deep"}
    assert [n for n, p in head.named_parameters() if p.grad is None] == []
    # non-zero everywhere but the level encoding, which only reaches the sampling offsets and weights of the
    # deformable attention: those start at zero weights (their init), so its first gradient is exactly 0
    zero = [n for n, p in head.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == ["pixel_decoder.level_encoding.weight"]
