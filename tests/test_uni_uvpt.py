"""uni_uvpt.py: adapter parameter counts and wiring, the injector's near-identity start, the target losses
and the label-correction hook against hand computations, then the stages end to end on synthetic data."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import uni_uvpt as U
from common.io import UserError, atomic_save, load_checkpoint
from common.seg_data import SyntheticSeg
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


def test_mit_variant_starts_as_the_source_model_and_ignores_its_level_embed():
    """MiT: the same near-identity start; its level_embed exists (counted, official keys) but the official
    forward never adds it, while the Swin variant does."""
    from common.mit import MixVisionTransformer
    arch = U.BACKBONES["mit_toy"]["arch"]
    torch.manual_seed(0)
    plain = MixVisionTransformer(**arch, drop_path_rate=0.1)
    prompted = U.PromptMiT(**arch, drop_path_rate=0.1)
    prompted.add_prompt_adapter(list(plain.embed_dims), 0.1, deform_heads=2, conv_inplane=8)
    prompted.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), prompted.eval()
    x = torch.randn(1, 3, 128, 64)
    with torch.no_grad():
        ref, (feats, _) = plain(x), prompted(x)
        for a, b in zip(feats, ref):
            assert a.shape == b.shape and 0 < (a - b).abs().max() < 1e-4
        for inter in prompted.interactions:
            inter.injector.gamma.fill_(1.0)
        before = prompted(x)[0][-1]
        prompted.level_embed.add_(5.0)
        assert torch.equal(prompted(x)[0][-1], before)
        swin = tiny_swin().eval()
        for inter in swin.interactions:
            inter.injector.gamma.fill_(1.0)
        y = torch.randn(1, 3, 64, 64)
        before = swin(y)[0][-1]
        swin.level_embed.add_(5.0)
        assert not torch.allclose(swin(y)[0][-1], before)


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


# ----------------------------------------------------------------------------------------------------
# the command line: summaries, official checkpoint layouts, bad inputs

def summary_line(capsys, *argv):
    U.main(["--summary", *argv])
    out = capsys.readouterr().out
    return out.strip().splitlines()[-1], out


def test_summary_lines_of_the_issue(capsys):
    last, out = summary_line(capsys, "--stage", "adapt", "--backbone", "mit_b5")
    assert last == "params: total=93740950 trainable=12297942"
    assert "8,585,664" in out and "3,712,275" in out and "81,443,008" in out
    last, out = summary_line(capsys, "--stage", "adapt", "--backbone", "swin_b")
    assert last == "params: total=115353134 trainable=28608118"
    # the official launcher's setting trains the backbone too; the source model has no adapter
    last, _ = summary_line(capsys, "--stage", "adapt", "--backbone", "mit_b5", "--unfreeze-backbone")
    assert last == "params: total=93740950 trainable=93740950"
    last, _ = summary_line(capsys, "--stage", "source", "--backbone", "mit_b5")
    assert last == "params: total=85155283 trainable=85155283"   # audit C: MiT-B5 + DAFormer head


def official_adapter_keys(dims, inplane, heads):
    """The official uni-uvpt adapter keys and shapes (adapter_modules.py: SpatialPriorModule with
    conv4 and fc1..3, InteractionBlockPrompt with injector / extractor / up_layer1..3), written out from
    the module structure; MSDeformAttn with ratio 0.5 and 4 points."""
    keys = {}

    def bn(p, c):
        keys.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                     f"{p}.num_batches_tracked": ()})

    for j, ci in enumerate((3, inplane, inplane)):                 # stem: 3 x (conv, BN, ReLU), max-pool
        keys[f"spm.stem.{3 * j}.weight"] = (inplane, ci, 3, 3)
        bn(f"spm.stem.{3 * j + 1}", inplane)
    for name, ci, co in (("conv2", inplane, 2 * inplane), ("conv3", 2 * inplane, 4 * inplane),
                         ("conv4", 4 * inplane, 4 * inplane)):
        keys[f"spm.{name}.0.weight"] = (co, ci, 3, 3)
        bn(f"spm.{name}.1", co)
    for j, ci in enumerate((inplane, 2 * inplane, 4 * inplane), 1):
        keys[f"spm.fc{j}.weight"], keys[f"spm.fc{j}.bias"] = (dims[0], ci, 1, 1), (dims[0],)
    keys["level_embed"] = (3, dims[0])
    for i, d in enumerate(dims):
        p = f"interactions.{i}"
        for part, levels in (("injector", 3), ("extractor", 1)):
            for norm in ("query_norm", "feat_norm"):
                keys[f"{p}.{part}.{norm}.weight"] = keys[f"{p}.{part}.{norm}.bias"] = (d,)
            v, n = d // 2, heads * levels * 4
            keys.update({f"{p}.{part}.attn.sampling_offsets.weight": (2 * n, d),
                         f"{p}.{part}.attn.sampling_offsets.bias": (2 * n,),
                         f"{p}.{part}.attn.attention_weights.weight": (n, d),
                         f"{p}.{part}.attn.attention_weights.bias": (n,),
                         f"{p}.{part}.attn.value_proj.weight": (v, d), f"{p}.{part}.attn.value_proj.bias": (v,),
                         f"{p}.{part}.attn.output_proj.weight": (d, v), f"{p}.{part}.attn.output_proj.bias": (d,)})
        keys[f"{p}.injector.gamma"] = (d,)
        h = d // 4
        keys.update({f"{p}.extractor.ffn.fc1.weight": (h, d), f"{p}.extractor.ffn.fc1.bias": (h,),
                     f"{p}.extractor.ffn.dwconv.dwconv.weight": (h, 1, 3, 3),
                     f"{p}.extractor.ffn.dwconv.dwconv.bias": (h,),
                     f"{p}.extractor.ffn.fc2.weight": (d, h), f"{p}.extractor.ffn.fc2.bias": (d,),
                     f"{p}.extractor.ffn_norm.weight": (d,), f"{p}.extractor.ffn_norm.bias": (d,)})
        if i + 1 < len(dims):
            for j in (1, 2, 3):
                keys[f"{p}.up_layer{j}.weight"] = (dims[i + 1], d, 3, 3)
    return keys


def test_adapter_keys_are_the_official_ones():
    with torch.device("meta"):
        for backbone, dims in (("swin_b", (128, 256, 512, 1024)), ("mit_b5", (64, 128, 320, 512))):
            model = U.build_model(U.get_args(["--stage", "adapt", "--backbone", backbone, "--summary"]), 19)
            ours = {k[len("backbone."):]: tuple(v.shape) for k, v in model.state_dict().items()
                    if k.startswith("backbone.") and k[len("backbone."):].startswith(U.ADAPTER_KEYS)}
            assert ours == official_adapter_keys(dims, 64, 16), backbone
            assert tuple(model.scale_logits.shape) == (3,)


def toy_args(stage, backbone="swin_toy", *extra):
    return U.get_args(["--stage", stage, "--preset", "synthetic", "--backbone", backbone, "--summary", *extra])


def test_what_each_stage_trains_and_at_which_lr():
    """The configs' custom_keys: source: heads lr x10, backbone norms without decay; adapt (backbone frozen):
    the adapter (spm, interactions, level_embed) lr x5 with its LayerNorms decayed ('interactions' beats
    'norm'), the head x10, the three scale logits x1; no backbone parameter; --unfreeze-backbone adds them."""
    def where(stage, backbone, *extra):
        args = toy_args(stage, backbone, *extra)
        model = U.build_model(args, 6)
        opt = U.build_optimizer(model, args, U.SOURCE_KEYS if stage == "source" else U.ADAPT_KEYS)
        assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
        return {n: (g["lr_scale"], g["weight_decay"] / args.weight_decay) for g in opt.param_groups for n in g["names"]}
    src = where("source", "mit_toy")
    assert src["backbone.block1.0.norm1.weight"] == (1.0, 0.0) and src["backbone.block1.0.mlp.fc1.weight"] == (1.0, 1.0)
    assert all(v == (10.0, 1.0) for n, v in src.items() if n.startswith("decode_head."))
    for backbone in ("mit_toy", "swin_toy"):
        ad = where("adapt", backbone)
        assert not any(n.startswith("backbone.") and not n[len("backbone."):].startswith(U.ADAPTER_KEYS) for n in ad)
        assert ad["scale_logits"] == (1.0, 1.0) and ad["backbone.level_embed"] == (5.0, 1.0)
        assert ad["backbone.interactions.0.injector.query_norm.weight"] == (5.0, 1.0)
        assert ad["backbone.spm.stem.1.weight"] == (5.0, 1.0)
        assert all(v == (10.0, 1.0) for n, v in ad.items() if n.startswith("decode_head."))
    free = where("adapt", "mit_toy", "--unfreeze-backbone")
    assert free["backbone.block1.0.norm1.weight"] == (1.0, 0.0) and free["backbone.block1.0.attn.q.weight"] == (1.0, 1.0)


def randomised(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
            elif v.is_floating_point():
                v.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("backbone", ["swin_toy", "mit_toy"])
def test_official_adapted_checkpoint_loads(tmp_path, backbone):
    """An official Uni-UVPT checkpoint (mmcv: meta + state_dict; Swin in mmseg's layout, MiT in SegFormer's;
    the adapter under backbone.spm / interactions / level_embed; the scale logits as top-level 'weight')
    loads for --eval-only into exactly the weights it was made from."""
    from tests.test_swin import official_to_mmseg
    args = toy_args("adapt", backbone)
    model = randomised(U.build_model(args, 6), 0)
    sd = model.state_dict()
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    adapter = {k: v for k, v in bb.items() if k.startswith(U.ADAPTER_KEYS)}
    plain = {k: v for k, v in bb.items() if k not in adapter}
    if backbone == "swin_toy":
        plain = official_to_mmseg(plain)
        assert any(k.startswith("stages.0.blocks.0.attn.w_msa.") for k in plain)
    official = {**{f"backbone.{k}": v for k, v in {**plain, **adapter}.items()},
                **{k: v for k, v in sd.items() if k.startswith("decode_head.")}, "weight": sd["scale_logits"]}
    atomic_save({"meta": {"iter": 80000}, "state_dict": official}, tmp_path / "uvpt.pth")
    fresh = randomised(U.build_model(args, 6), 1)
    U.load_segmentor(fresh, str(tmp_path / "uvpt.pth"), "--checkpoint", args)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_source_checkpoints_gta_heads_and_the_other_backbone(tmp_path, capsys):
    """A Source-GtA model loads into the prompted network with its decode_head_aug0..5 dropped (one line);
    the adapter keeps its init. A MiT model refuses to load into a Swin, and an adapted model refuses to
    serve as a source model."""
    src = randomised(U.build_model(toy_args("source"), 6), 2).state_dict()
    gta = {**src, **{f"decode_head_aug{j}.{k[len('decode_head.'):]}": v for j in range(6)
                     for k, v in src.items() if k.startswith("decode_head.")}}
    atomic_save({"state_dict": gta}, tmp_path / "gta.pth")
    args = toy_args("adapt")
    model = U.build_model(args, 6)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    U.load_segmentor(model, str(tmp_path / "gta.pth"), "--source-checkpoint", args)
    out = capsys.readouterr().out
    assert "decode_head_aug0..5" in out and "gta.pth" in out and len(out.strip().splitlines()) == 1
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and k[len("backbone."):].startswith(U.ADAPTER_KEYS):
            assert torch.equal(v, init[k]), k
        elif k != "scale_logits":
            assert torch.equal(v, src[k]), k
    mit_src = U.build_model(toy_args("source", "mit_toy"), 6).state_dict()
    atomic_save({"model": mit_src}, tmp_path / "mit.pth")
    with pytest.raises(UserError, match=r"mit\.pth holds a MiT .* --backbone swin_toy"):
        U.load_segmentor(U.build_model(args, 6), str(tmp_path / "mit.pth"), "--source-checkpoint", args)
    atomic_save({"model": model.state_dict()}, tmp_path / "adapted.pt")
    with pytest.raises(UserError, match="adapted Uni-UVPT model"):
        U.load_segmentor(U.build_model(toy_args("pseudo"), 6), str(tmp_path / "adapted.pt"), "--source-checkpoint",
                         toy_args("pseudo"))


# ----------------------------------------------------------------------------------------------------
# the stages on the official folder layouts: source-free, bad inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINID_TO_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def write_domain_layouts(root, n_src=4, n_train=4, n_val=2, size=(128, 256)):
    """GTA5 (source: images/*.png, labels/*.png of Cityscapes label ids) and Cityscapes (target:
    leftImg8bit/ + gtFine/*_labelTrainIds.png) with fixed-size images of SyntheticSeg's two domains."""
    src = SyntheticSeg(n_src, 6, size=size, seed=3, domain="source")
    tgt = {s: SyntheticSeg(n, 6, size=size, split=s, seed=3, domain="target") for s, n in (("train", n_train), ("val", n_val))}
    gta, cs = os.path.join(root, "gta5"), os.path.join(root, "cityscapes")
    save = lambda path, arr: (os.makedirs(os.path.dirname(path), exist_ok=True), Image.fromarray(arr).save(path))
    for i in range(n_src):
        img, lab = src.generate(i)
        save(os.path.join(gta, "images", f"{i:05d}.png"), img)
        save(os.path.join(gta, "labels", f"{i:05d}.png"), np.array(_TRAINID_TO_ID, dtype=np.uint8)[lab])
    for split, ds in tgt.items():
        for i in range(len(ds)):
            img, lab = ds.generate(i)
            city = ("aachen", "bochum")[i % 2] if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            save(os.path.join(cs, "leftImg8bit", split, city, stem + "_leftImg8bit.png"), img)
            save(os.path.join(cs, "gtFine", split, city, stem + "_gtFine_labelTrainIds.png"), lab)
    return gta, cs


def layout_flags(gta, cs):
    return ["--preset", "gta2cs", "--backbone", "swin_toy", "--source-root", gta, "--target-root", cs,
            "--test-scale", "256", "128", "--crop", "128", "--workers", "0", "--vis", "0"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The two layouts and a source model trained for 2 iterations on GTA5 (evaluated on Cityscapes val)."""
    root = tmp_path_factory.mktemp("layouts")
    gta, cs = write_domain_layouts(str(root))
    flags = layout_flags(gta, cs)
    torch.set_num_threads(1)
    m = U.main(["--stage", "source", *flags, "--scale", "256", "128", "--iters", "2", "--batch-size", "2",
                "--work-dir", str(root / "source")])
    assert 0 <= m["mIoU"] <= 100
    return root, gta, cs, str(root / "source" / "last.pt")


AUDIT = r"""
import json, sys
sys.path.insert(0, {root!r})
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        f, in_eval = sys._getframe(1), False
        while f is not None:
            in_eval = in_eval or (f.f_code.co_name == "evaluate" and f.f_code.co_filename.endswith("segment.py"))
            f = f.f_back
        opened.append((args[0], in_eval))
sys.addaudithook(hook)
import uni_uvpt
for argv in {runs!r}:
    uni_uvpt.main(argv)
json.dump(opened, open({out!r}, "w"))
"""


def test_pseudo_and_adapt_are_source_free(layouts, tmp_path):
    """Every file opened by --stage pseudo and --stage adapt, recorded by an audit hook: no GTA5 file at
    all, no Cityscapes train label, Cityscapes val labels only inside the evaluation."""
    root, gta, cs, source = layouts
    flags = ["--preset", "gta2cs", "--backbone", "swin_toy", "--target-root", cs, "--test-scale", "256", "128",
             "--crop", "128", "--workers", "0", "--vis", "0"]
    runs = [["--stage", "pseudo", *flags, "--source-checkpoint", source, "--pseudo-dir", str(tmp_path / "pl"),
             "--work-dir", str(tmp_path / "p")],
            ["--stage", "adapt", *flags, "--source-checkpoint", source, "--pseudo-dir", str(tmp_path / "pl"),
             "--scale", "256", "128", "--iters", "2", "--batch-size", "1", "--eval-interval", "2",
             "--curve-interval", "1", "--queue", "2", "--work-dir", str(tmp_path / "a")]]
    out = tmp_path / "opened.json"
    code = AUDIT.format(root=ROOT, runs=runs, out=str(out))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    opened = [(os.path.realpath(p), ev) for p, ev in json.load(open(out))]
    gta, cs = os.path.realpath(gta), os.path.realpath(cs)
    assert not [p for p, _ in opened if p.startswith(gta + os.sep)]
    assert not [p for p, _ in opened if p.startswith(os.path.join(cs, "gtFine", "train"))]
    val_labels = [ev for p, ev in opened if p.startswith(os.path.join(cs, "gtFine", "val"))]
    assert val_labels and all(val_labels)                              # read, and only while evaluating
    train_images = {p for p, _ in opened if p.startswith(os.path.join(cs, "leftImg8bit", "train"))}
    assert len(train_images) == 4                                      # the hook does see what is read
    assert len(os.listdir(tmp_path / "pl" / "aachen")) == 2 and (tmp_path / "a" / "last.pt").exists()


def test_bad_inputs_fail_with_one_clear_error(layouts, tmp_path):
    root, gta, cs, source = layouts
    flags = ["--preset", "gta2cs", "--backbone", "swin_toy", "--target-root", cs, "--test-scale", "256", "128",
             "--crop", "128", "--workers", "0", "--vis", "0", "--source-checkpoint", source]
    pl = tmp_path / "pl"
    U.main(["--stage", "pseudo", *flags, "--pseudo-dir", str(pl), "--work-dir", str(tmp_path / "p")])
    adapt = ["--stage", "adapt", *flags, "--pseudo-dir", str(pl), "--scale", "256", "128", "--iters", "1",
             "--batch-size", "1", "--work-dir", str(tmp_path / "a")]
    # a pseudo-label folder that does not match the target train split: a file missing, then one extra
    victim = sorted((pl / "bochum").iterdir())[0]
    os.rename(victim, tmp_path / "aside.png")
    with pytest.raises(UserError, match=r"does not match the target train split \(4 images\): 1 missing"):
        U.main(adapt)
    os.rename(tmp_path / "aside.png", victim)
    (pl / "frankfurt").mkdir()
    Image.fromarray(np.zeros((128, 256), np.uint8)).save(pl / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png")
    with pytest.raises(UserError, match="1 not of this split"):
        U.main(adapt)
    # pseudo labels written again into a folder that holds some: refused, nothing overwritten
    before = {p: p.read_bytes() for p in pl.rglob("*.png")}
    with pytest.raises(UserError, match="is not empty"):
        U.main(["--stage", "pseudo", *flags, "--pseudo-dir", str(pl), "--work-dir", str(tmp_path / "p2")])
    assert {p: p.read_bytes() for p in pl.rglob("*.png")} == before
    (pl / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png").unlink()
    # a source checkpoint of the other backbone
    with pytest.raises(UserError, match="holds a Swin backbone, but --backbone mit_toy"):
        U.main([*adapt, "--backbone", "mit_toy"])
    # an input size the adapter cannot take: the test scale, then the crop
    with pytest.raises(UserError, match=r"--test-scale 200 100: .* become 100x200, .* multiples of 64"):
        U.main([*adapt, "--test-scale", "200", "100"])
    with pytest.raises(SystemExit):
        U.get_args([*adapt, "--crop", "192"])
    assert not (tmp_path / "a" / "last.pt").exists() and not (tmp_path / "a" / "best.pt").exists()


@pytest.mark.parametrize("flag,value,expected", [
    ("--iters", "0", "--iters 0: expected a positive number"),
    ("--lr", "0", "--lr 0.0: expected a positive number"),
    ("--queue", "-1", "--queue -1: expected a positive number"),
    ("--deform-heads", "0", "--deform-heads 0: expected a positive number"),
    ("--quantile", "0", "--quantile 0.0: expected a value in (0, 1)"),
    ("--quantile", "1", "--quantile 1.0: expected a value in (0, 1)")])
def test_flag_errors_are_one_line(flag, value, expected, capsys):
    with pytest.raises(SystemExit):
        U.get_args(["--stage", "adapt", "--preset", "synthetic", "--summary", flag, value])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"


# ----------------------------------------------------------------------------------------------------
# the synthetic domain pair: two processes, exact resume

SYN = ["--preset", "synthetic", "--workers", "0", "--vis", "0"]


@pytest.fixture(scope="module")
def random_source(tmp_path_factory):
    """A source model as --stage source writes it (random weights: what matters here is the plumbing)."""
    path = tmp_path_factory.mktemp("src") / "source.pt"
    torch.manual_seed(0)
    atomic_save({"model": U.build_model(toy_args("source"), 6).state_dict(), "iter": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def pseudo4(random_source, tmp_path_factory):
    """The pseudo labels of 4 synthetic target images from random_source (the adapt stage only reads them)."""
    root = tmp_path_factory.mktemp("pseudo4")
    U.main(["--stage", "pseudo", *SYN, "--num-samples", "4", "--source-checkpoint", random_source,
            "--pseudo-dir", str(root / "pl"), "--work-dir", str(root / "p")])
    return str(root / "pl")


def torchrun(*argv):
    """uni_uvpt.py under torchrun, two processes; fails the test with the end of stderr if it does not exit 0."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "uni_uvpt.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_write_the_pseudo_labels_of_one(random_source, tmp_path):
    common = ["--stage", "pseudo", *SYN, "--num-samples", "6", "--source-checkpoint", random_source]
    U.main([*common, "--pseudo-dir", str(tmp_path / "one"), "--work-dir", str(tmp_path / "w1")])
    torchrun(*common, "--pseudo-dir", str(tmp_path / "two"), "--work-dir", str(tmp_path / "w2"))
    one = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(one) == 6 and one == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in one:
        a, b = (np.array(Image.open(tmp_path / d / name)) for d in ("one", "two"))
        assert a.shape == (128, 128) and np.array_equal(a, b), name
    assert json.load(open(tmp_path / "two" / "pseudo_labels.json"))["images"] == 6


def test_adapt_resumes_exactly_with_the_correction_state(random_source, pseudo4, tmp_path):
    """4 images at batch 2: an epoch is 2 iterations, so the correction runs from iteration 2 on."""
    common = ["--stage", "adapt", *SYN, "--num-samples", "4", "--source-checkpoint", random_source,
              "--pseudo-dir", pseudo4, "--iters", "8", "--batch-size", "2", "--curve-interval", "1", "--queue", "2",
              "--eval-interval", "100", "--ckpt-interval", "100", "--lr", "1e-3"]
    U.main([*common, "--work-dir", str(tmp_path / "a")])
    U.main([*common, "--work-dir", str(tmp_path / "b"), "--stop-at", "4"])
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iter"] == 4
    U.main([*common, "--work-dir", str(tmp_path / "b"), "--resume"])
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("a", "b"))
    assert a["iter"] == b["iter"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ca, cb = a["correction"], b["correction"]
    assert len(ca["history"]) == 8 and ca["thresholds"].abs().sum() > 0       # the 2-crop queue is full at once
    assert torch.equal(ca["history"].nan_to_num(-1), cb["history"].nan_to_num(-1))
    for key in ("labels", "preds", "confs"):
        assert sorted(ca[key]) == sorted(cb[key]) == [0, 1, 2, 3]
        for i in ca[key]:
            assert torch.equal(ca[key][i], cb[key][i]), (key, i)
    for key in ("updating", "last_iter", "last_idx", "filled", "pos"):
        assert ca[key] == cb[key], key
    assert torch.equal(ca["thresholds"], cb["thresholds"])


def test_adapt_under_torchrun_gathers_the_correction_of_every_image(random_source, pseudo4, tmp_path):
    """Two processes, one image each per step, the correction from iteration 2 on: rank 0's last.pt holds
    the predictions of all 4 images (each process adapted its own half) and a full IoU history."""
    torchrun("--stage", "adapt", *SYN, "--num-samples", "4", "--source-checkpoint", random_source, "--pseudo-dir",
             pseudo4, "--iters", "6", "--batch-size", "2", "--curve-interval", "1", "--queue", "2",
             "--eval-interval", "6", "--lr", "1e-3", "--work-dir", str(tmp_path / "a"))
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    c = ck["correction"]
    assert ck["iter"] == 6 and len(c["history"]) == 6 and c["thresholds"].abs().sum() > 0
    for key in ("labels", "preds", "confs"):
        assert sorted(c[key]) == [0, 1, 2, 3], key
    assert all(c["preds"][i].dtype == torch.uint8 and c["confs"][i].dtype == torch.float16 for i in range(4))
    assert load_checkpoint(tmp_path / "a" / "best.pt")["iter"] == 6


def test_adapted_model_beats_the_source_model_on_the_target(tmp_path):
    """The whole method on the synthetic domain pair with fixed seeds: a short source training, its pseudo
    labels, 30 adaptation iterations evaluated every 10 with the best kept (the official save_best on
    the target val split). The adapted model beats the source model it started from by the issue's 2 mIoU
    points on the target val split (this recipe, seeds 0 / 1 / 2: 22.6 -> 26.4, 26.9 -> 32.9, 18.8 -> 23.5)."""
    syn = [*SYN, "--num-samples", "32", "--seed", "1"]
    src = U.main(["--stage", "source", *syn, "--iters", "300", "--batch-size", "4", "--lr", "4e-3",
                  "--eval-interval", "300", "--work-dir", str(tmp_path / "s")])
    ckpt = str(tmp_path / "s" / "best.pt")
    pseudo = U.main(["--stage", "pseudo", *syn, "--source-checkpoint", ckpt, "--pseudo-dir", str(tmp_path / "pl"),
                     "--eval-pseudo", "--work-dir", str(tmp_path / "p")])
    U.main(["--stage", "adapt", *syn, "--source-checkpoint", ckpt, "--pseudo-dir", str(tmp_path / "pl"),
            "--iters", "30", "--batch-size", "2", "--eval-interval", "10", "--work-dir", str(tmp_path / "a")])
    evals = [json.loads(line)["mIoU"] for line in open(tmp_path / "a" / "log.jsonl") if '"mIoU"' in line]
    best = load_checkpoint(tmp_path / "a" / "best.pt")
    assert len(evals) == 3 and best["mIoU"] == max(evals)
    print(f"source {src['mIoU']:.2f}  pseudo labels {pseudo['mIoU']:.2f}  adapted {evals}")
    assert best["mIoU"] >= src["mIoU"] + 2, (src["mIoU"], evals)
    # best.pt is the adapted model: evaluating it again gives its mIoU
    again = U.main(["--stage", "adapt", *syn, "--eval-only", "--checkpoint", str(tmp_path / "a" / "best.pt")])
    assert again["mIoU"] == pytest.approx(best["mIoU"], abs=1e-6)
