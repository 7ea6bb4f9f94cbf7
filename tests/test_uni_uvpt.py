"""uni_uvpt.py: adapter parameter counts and wiring, the injector's near-identity start, the target losses
and the label-correction hook against hand computations, then the stages end to end on synthetic data."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import uni_uvpt as U
from common.io import UserError, atomic_save, load_checkpoint
from common.swin import SWIN_SIZES, SwinTransformer


def tiny_swin(prompted=True, dim=32, heads=4, inplane=16, seed=0):
    torch.manual_seed(seed)
    cls = U.PromptSwin if prompted else SwinTransformer
    m = cls(embed_dim=dim, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.1)
    if prompted:
        m.add_prompt_adapter(m.num_features, 0.1, deform_heads=heads, conv_inplane=inplane)
    return m


# ----------------------------------------------------------------------------------------------------
# the adapter

def test_swin_b_adapter_count_matches_the_audit():
    with torch.device("meta"):
        m = U.PromptSwin(**SWIN_SIZES["base"], drop_path_rate=0.3)
        m.add_prompt_adapter(m.num_features, 0.3)
    count = lambda pred: sum(p.numel() for n, p in m.named_parameters() if pred(n))
    assert count(lambda n: n.startswith("spm.")) == 1_093_312
    assert count(lambda n: n.startswith("spm.conv4.")) == 590_336
    assert count(lambda n: ".injector." in n or ".extractor." in n) == 4_993_312
    assert count(lambda n: ".up_layer" in n) == 18_579_456
    assert count(lambda n: n == "level_embed") == 384
    assert count(lambda n: n.startswith(U.ADAPTER_KEYS)) == 24_666_464
    assert count(lambda n: not n.startswith(U.ADAPTER_KEYS)) == 86_745_016  # mmseg Swin-B with norm0..3


def test_injector_gamma_start_reproduces_the_source_model():
    """gamma = 1e-6: the prompted Swin's features equal the plain Swin's (same weights) to ~1e-4 at step 0;
    gamma = 0 gives them exactly; a trained-size gamma changes them."""
    x = torch.randn(2, 3, 128, 192)
    plain, prompted = tiny_swin(False), tiny_swin(True, seed=1)
    result = prompted.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith(U.ADAPTER_KEYS) for k in result.missing_keys)
    plain.eval(), prompted.eval()
    with torch.no_grad():
        ref = plain(x)
        feats, injected = prompted(x)
        assert len(feats) == len(injected) == 4
        for a, b in zip(feats, ref):
            assert a.shape == b.shape and 0 < (a - b).abs().max() < 1e-4
        for inter in prompted.interactions:
            inter.injector.gamma.zero_()
        for a, b in zip(prompted(x)[0], ref):
            assert torch.equal(a, b)
        for inter in prompted.interactions:
            inter.injector.gamma.fill_(1.0)
        assert (prompted(x)[0][-1] - ref[-1]).abs().max() > 1e-2


def test_shapes_and_the_multiple_of_64_rule():
    m = tiny_swin().eval()
    with torch.no_grad():
        feats, injected = m(torch.randn(1, 3, 64, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 32), (64, 8, 16), (128, 4, 8), (256, 2, 4)]
    assert [tuple(f.shape) for f in feats] == [tuple(f.shape) for f in injected]
    with pytest.raises(UserError, match="multiples of 64"):
        m(torch.randn(1, 3, 96, 128))


def test_deform_inputs_by_hand():
    (ref_i, shapes_i, starts_i), (ref_e, shapes_e, starts_e) = U.deform_inputs(2, 4, "cpu")
    assert shapes_i.tolist() == [[4, 8], [2, 4], [1, 2]] and starts_i.tolist() == [0, 32, 40]
    assert shapes_e.tolist() == [[2, 4]] and starts_e.tolist() == [0]
    assert ref_i.shape == (1, 8, 1, 2) and ref_i[0, 5, 0].tolist() == [1.5 / 4, 1.5 / 2]   # token (1, 1)
    assert ref_e.shape == (1, 32 + 8 + 2, 1, 2)
    assert ref_e[0, 9, 0].tolist() == [1.5 / 8, 1.5 / 4]        # P1 cell (1, 1) of the 4x8 grid
    assert ref_e[0, 41, 0].tolist() == [1.5 / 2, 0.5 / 1]       # P3 cell (0, 1) of the 1x2 grid


def test_next_prompts_come_from_the_input_prompts():
    """Official quirk: up_layer1..3 read this stage's input prompts; the extractor's output only feeds
    the injector. Changing the extractor changes x, not the next prompts."""
    torch.manual_seed(0)
    inter = U.PromptInteraction(32, 64, 4, 4, 0.5, 1.0, 0.0).eval()
    h, w = 2, 4
    x = torch.randn(1, h * w, 32)
    prompts = [torch.randn(1, n, 32) for n in (4 * h * w, h * w, h * w // 4)]
    x1, nxt = inter(x, prompts, (h, w))
    expected = F.conv2d(prompts[0].transpose(1, 2).reshape(1, 32, 2 * h, 2 * w), inter.up_layer1.weight,
                        stride=2, padding=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(nxt[0], expected)
    assert [t.shape[1] for t in nxt] == [h * w, h * w // 4, 1]
    with torch.no_grad():
        inter.extractor.ffn.fc2.weight.normal_()  # (a constant shift would vanish in the LayerNorm)
    x2, nxt2 = inter(x, prompts, (h, w))
    assert all(torch.equal(a, b) for a, b in zip(nxt, nxt2)) and not torch.allclose(x1, x2)


# ----------------------------------------------------------------------------------------------------
# losses, by hand

def test_lovasz_softmax_by_hand():
    # 4 pixels (one ignored), 2 classes; the batch of 2 images is flattened into one set
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]])  # pixel, class
    label = torch.tensor([0, 0, 1, 255])
    p = probs.view(2, 1, 2, 2).permute(0, 3, 1, 2)                          # (B=2, K=2, 1, 2)
    lab = label.view(2, 1, 2)
    # class 0: fg = [1, 1, 0], errors |fg - p0| = [0.1, 0.6, 0.3] -> sorted 0.6 (fg), 0.3 (bg), 0.1 (fg)
    #   Jaccard loss of the first i sorted pixels being wrong: i=1: 1 - 1/2; i=2: 1 - 1/3; i=3: 1 - 0/3
    #   loss = 0.6 * 1/2 + 0.3 * (2/3 - 1/2) + 0.1 * (1 - 2/3)
    l0 = 0.6 * 0.5 + 0.3 * (2 / 3 - 0.5) + 0.1 * (1 - 2 / 3)
    # class 1: fg = [0, 0, 1], errors |fg - p1| = [0.1, 0.6, 0.3] -> sorted 0.6 (bg), 0.3 (fg), 0.1 (bg)
    #   i=1: 1 - 1/2; i=2: 1 - 0/1; i=3: 1 - 0/2
    l1 = 0.6 * 0.5 + 0.3 * 0.5 + 0.1 * 0.0
    torch.testing.assert_close(U.lovasz_softmax(p, lab), torch.tensor((l0 + l1) / 2))
    # a class absent from the labels does not count ('present'); all-ignored gives 0 with a gradient
    torch.testing.assert_close(U.lovasz_softmax(p, torch.zeros_like(lab)), U.lovasz_softmax(p[:, [0, 1]], torch.zeros_like(lab)))
    z = p.clone().requires_grad_()
    out = U.lovasz_softmax(z, torch.full_like(lab, 255))
    out.backward()
    assert out.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))


def test_self_training_loss_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, -1.0]]]])   # (1, K=3, 1, 2)
    label = torch.tensor([[[0, 255]]])
    p = torch.softmax(logits, 1)
    ent = [-(p[0, :, 0, j] * p[0, :, 0, j].log()).sum() / math.log(3) for j in range(2)]
    robust = sum((e ** 2 + 1e-8) ** 2 for e in ent) / 2          # over ALL pixels, the ignored one too
    expected = U.lovasz_softmax(p, label) + 0.005 * robust
    torch.testing.assert_close(U.self_training_loss(logits, label, 3), expected)
    # one valid pixel of class 0: Lovasz = its error 1 - p0
    torch.testing.assert_close(U.lovasz_softmax(p, label), 1 - p[0, 0, 0, 0])


def test_prediction_consistency_by_hand():
    # B=1, K=2, 1x2 pixels; scale weights softmax((0, log 2, 0)) = (1/4, 1/2, 1/4)
    z = [torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]]), torch.tensor([[[[2.0, 0.5]], [[0.0, 0.0]]]]),
         torch.tensor([[[[4.0, -1.0]], [[0.0, 0.0]]]])]
    w = torch.tensor([0.0, math.log(2), 0.0]).softmax(0)
    label = torch.tensor([[[1, 255]]])
    p = [torch.softmax(t, 1)[0, :, 0] for t in z]                  # 3 x (K, 2 pixels)
    m = (0.25 * p[0] + 0.5 * p[1] + 0.25 * p[2]).clamp(1e-3, 1 - 1e-3)
    # pixel 0 is labelled and its mixture max is > 0.8; pixel 1 is ignored: masked out
    assert m[:, 0].max() >= 0.8
    kl0 = sum((pk[:, 0] * (pk[:, 0].log() - m[:, 0].log())).sum() for pk in p)
    torch.testing.assert_close(U.prediction_consistency(z, label, w), kl0 / 2)
    # labelled but unsure (threshold above the max): nothing counts
    assert U.prediction_consistency(z, label, w, threshold=0.999).item() == 0
    # the mask is per image: a confident image does not switch on an unsure one
    z2 = [torch.cat([t, torch.zeros_like(t)]) for t in z]
    torch.testing.assert_close(U.prediction_consistency(z2, torch.cat([label, torch.tensor([[[0, 0]]])]), w), kl0 / 4)


def test_feature_consistency_by_hand():
    f1 = torch.tensor([[[[0.5, 2.0], [-1.0, 0.2]]]])          # (1, 1, 2, 2): clamped to [1e-3, 0.999]
    fs = torch.tensor([[[[0.3]]]])                             # x0.5: resized 1x1 -> 2x2 = constant
    fl = torch.rand(1, 1, 4, 4)                                # x2: resized 4x4 -> 2x2, align_corners=True
    fl_r = fl[:, :, ::3, ::3]                                  # corners: exactly the sampled pixels
    a = f1.clamp(1e-3, 0.999)
    b = torch.full_like(a, 0.3)
    c = fl_r.clamp(1e-3, 0.999)
    mean = (a + b + c) / 3
    expected = (((a - mean) ** 2).mean() + ((b - mean) ** 2).mean() + ((c - mean) ** 2).mean()) / 3
    torch.testing.assert_close(U.feature_consistency([f1, fs, fl]), expected)


class _Pool(torch.nn.Module):
    """A stand-in backbone: 4x4 average pool of the image's first 2 channels as 'features' (and, as the
    injected maps, the same pooled image); the head is the identity, so logits = pooled channels."""

    def forward(self, img):
        f = F.avg_pool2d(img[:, :2], 4)
        return [f], [f, 2 * f]


class _Identity(torch.nn.Module):
    def forward(self, feats):
        return feats[0]


def test_target_objective_on_a_tiny_input():
    """UniUVPT.target_losses against the spec's formulas written out here: three scales by bilinear
    (align_corners=True) resizing, everything upsampled to the label with align_corners=True."""
    torch.manual_seed(1)
    img = torch.randn(1, 3, 8, 8) * 6
    label = torch.randint(0, 2, (1, 8, 8))
    label[0, :2] = 255
    model = U.UniUVPT(_Pool(), _Identity(), num_classes=2)
    with torch.no_grad():
        model.scale_logits.copy_(torch.tensor([0.2, -0.1, 0.4]))
    total, parts, (pred, conf) = model(img, label)
    xs = [img, F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=True),
          F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=True)]
    z = [F.avg_pool2d(x[:, :2], 4) for x in xs]                           # logits at 2x2, 1x1, 4x4
    up = [F.interpolate(t, (8, 8), mode="bilinear", align_corners=True) for t in z]
    probs = [t.softmax(1) for t in up]
    w = torch.tensor([0.2, -0.1, 0.4]).softmax(0)
    m = (w[0] * probs[0] + w[1] * probs[1] + w[2] * probs[2]).clamp(1e-3, 1 - 1e-3)
    ent = -(probs[0] * probs[0].log()).sum(1) / math.log(2)
    st = U.lovasz_softmax(probs[0], label) + 0.005 * ((ent ** 2 + 1e-8) ** 2).mean()
    mask = ((m * (label != 255)[:, None]).amax(1) >= 0.8).float()       # (1, 8, 8)
    pc = (sum((pk * (pk / m).log()).sum(1) for pk in probs) * mask).mean()
    fc = []
    for scale in (1, 2):
        f = [t * scale for t in z]
        g = [f[0]] + [F.interpolate(t, (2, 2), mode="bilinear", align_corners=True) for t in f[1:]]
        g = [t.clamp(1e-3, 1 - 1e-3) for t in g]
        mu = sum(g) / 3
        fc.append(sum(((t - mu) ** 2).mean() for t in g) / 3)
    torch.testing.assert_close(parts["loss_st"], st)
    torch.testing.assert_close(parts["loss_pc"], pc)
    torch.testing.assert_close(parts["loss_fc0"], 0.001 * fc[0])
    torch.testing.assert_close(parts["loss_fc1"], 0.001 * fc[1])
    torch.testing.assert_close(total, st + pc + 0.001 * (fc[0] + fc[1]))
    assert mask.sum() > 0 and mask.sum() < (label != 255).sum()          # the mask does something here
    # pred / conf: the mixture of logits upsampled with align_corners=False
    pa = [F.interpolate(t, (8, 8), mode="bilinear", align_corners=False).softmax(1) for t in z]
    ma = (w[0] * pa[0] + w[1] * pa[1] + w[2] * pa[2]).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(conf, ma.max(1).values)
    assert torch.equal(pred, ma.argmax(1))
    # the scale logits get a gradient (through the mixture), the test path ignores them
    total.backward()
    assert model.scale_logits.grad.abs().sum() > 0
    torch.testing.assert_close(model(img), F.interpolate(z[0], (8, 8), mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------------------------------
# label correction

def _curve_corrector():
    """IoU of class 0 follows f(t) = 0.5 + 0.02 t - 0.00095 t^2 exactly (N = 20000 pixels, 10000 + 400 t
    - 19 t^2 predicted right); class 1 is never predicted right (IoU 0: a flat curve, f'(1) = 0)."""
    corr = U.LabelCorrection(num_classes=2, iters_per_epoch=5, interval=1, queue=1, slope=0.95, quantile=0.8)
    full = torch.zeros(100, 200, dtype=torch.uint8)

    def visit(it):
        t = it + 1
        right = 10000 + 400 * t - 19 * t * t
        pred = torch.ones(100, 200, dtype=torch.uint8).flatten()
        pred[:right] = 0
        corr.label(it // 5, 7, (0, 100, 0, 200), False, lambda: full.clone())
        corr.record(7, (0, 100, 0, 200), False, pred.view(100, 200), torch.full((100, 200), 0.9))
        return corr.step(it, it // 5)
    return corr, visit


def test_class_selection_follows_the_hand_computed_curve():
    # f'(t) = 0.02 - 0.0019 t: f'(1) = 0.0181; at n = 10 points f'(10) = 0.001 -> r = 0.0171 / 0.0181 = 0.9448;
    # at n = 11 f'(11) = -0.0009 -> r = (0.0181 - 0.0009) / 0.0181 = 0.9503 > 0.95: class 0 starts at it 10
    corr, visit = _curve_corrector()
    selected = [list(visit(it)) for it in range(16)]
    assert corr.history[:, 0].tolist() == pytest.approx([0.5 + 0.02 * t - 0.00095 * t * t for t in range(1, 17)])
    assert selected[:10] == [[]] * 10
    assert selected[10:15] == [[0]] * 5                 # one epoch (5 iterations) of correction
    assert selected[15] == []                           # then it leaves U; 5 points since: r fits anew
    assert corr.last_iter[0] == 10 and corr.last_idx[0] == 11
    # the same curve in epoch 0 selects nothing
    corr2, _ = _curve_corrector()
    corr2.history = corr.history[:11].clone()
    assert corr2.step(11 * 5, 0) == [] and corr2.flattened(0)


def test_quantile_thresholds_are_the_official_index_quantile():
    corr = U.LabelCorrection(num_classes=3, iters_per_epoch=10, quantile=0.8)
    rng = np.random.default_rng(0)
    preds, confs = [], []
    for i in range(3):
        pred = torch.from_numpy(rng.integers(0, 2, (4, 5))).to(torch.uint8)     # class 2 never predicted
        conf = torch.from_numpy(rng.uniform(0.3, 1.0, (4, 5))).half()
        corr.labels[i] = torch.zeros(4, 5, dtype=torch.uint8)
        corr.record(i, (0, 4, 0, 5), False, pred, conf)
        preds.append(pred), confs.append(conf)
    # a later visit replaces the image's stored prediction
    corr.record(1, (0, 4, 0, 5), True, preds[0], confs[0])
    preds[1], confs[1] = preds[0].flip(-1), confs[0].flip(-1)
    p, c = torch.stack(preds).numpy(), torch.stack(confs).float().numpy()
    expected = []
    for k in range(2):
        x = np.sort(c[p == k])
        i = int(np.round(len(x) * 0.8))
        expected.append(x[i] if i < len(x) else x[-1])
    assert corr.quantile_thresholds().tolist() == [float(e) for e in expected] + [0.0]


def test_label_edits_stay_inside_the_previous_crop_and_follow_flips():
    corr = U.LabelCorrection(num_classes=3, iters_per_epoch=10)
    g = torch.tensor([[0, 0, 1, 1, 2],
                      [0, 255, 1, 1, 2],
                      [2, 2, 2, 2, 2]], dtype=torch.uint8)
    assert corr.label(0, 5, (0, 2, 1, 4), False, lambda: g.clone()) is None        # epoch 0: offline labels
    # the model saw the crop (rows 0-1, cols 1-3) flipped; its prediction there, as it saw it:
    seen_pred = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.uint8)
    seen_conf = torch.tensor([[0.9, 0.5, 0.95], [0.2, 0.99, 0.99]]).half()
    corr.record(5, (0, 2, 1, 4), True, seen_pred, seen_conf)
    assert corr.preds[5].tolist() == [[0, 0, 1], [1, 0, 0]]                          # stored unflipped
    corr.updating, corr.thresholds = [0], torch.tensor([0.9, 0.0, 0.0]).half()
    # next visit, another crop box, not flipped: first G is corrected inside the previous box,
    # where pred == 0 (in U) and conf >= 0.9: unflipped conf [[0.95, 0.5, 0.9], [0.99, 0.99, 0.2]], so
    # (0, 0) stays 0 and (1, 1) of the box goes 1 -> 0; (1, 0) is predicted 1, not in U: stays 255
    out = corr.label(1, 5, (1, 3, 0, 5), False, lambda: None)
    assert corr.labels[5].tolist() == [[0, 0, 1, 1, 2],
                                       [0, 255, 0, 1, 2],
                                       [2, 2, 2, 2, 2]]
    assert out.tolist() == [[0, 255, 0, 1, 2], [2, 2, 2, 2, 2]]
    # no class of U inside the previous crop: nothing changes (official isdisjoint test)
    corr.updating = [2]
    before = corr.labels[5].clone()
    out = corr.label(1, 5, (0, 2, 0, 2), True, lambda: None)
    assert torch.equal(corr.labels[5], before)
    assert out.tolist() == [[0, 0], [255, 0]]                                      # G's [[0, 0], [0, 255]] flipped


def test_correction_state_resumes_exactly(tmp_path):
    corr, visit = _curve_corrector()
    for it in range(12):
        visit(it)
    atomic_save({"c": corr.state_dict()}, tmp_path / "s.pt")
    fresh, _ = _curve_corrector()
    fresh.load_state_dict(load_checkpoint(tmp_path / "s.pt")["c"])
    assert torch.equal(fresh.hist, corr.hist) and fresh.updating == corr.updating == [0]
    for a, b in ((corr.labels[7], fresh.labels[7]), (corr.confs[7], fresh.confs[7]), (corr.areas, fresh.areas)):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert corr.preds[7].dtype == torch.uint8 and corr.confs[7].dtype == torch.float16
