"""ops/: multi-scale deformable attention kernels against the grid_sample reference, the reference against
an independent gather-based bilinear written here, gradients (gradcheck), the module, the fallback.

The first run compiles the C++ CPU kernel (seconds) into the cache folder; CUDA tests run where a GPU is.
"""
import math
import warnings

import pytest
import torch

from ops import MSDeformAttn, build, ms_deform_attn, ms_deform_attn_pytorch
from ops import msda as msda_module

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(N, shapes, M, D, Lq, P, dtype=torch.float64, device="cpu", lo=-0.2, hi=1.2, seed=0):
    """Random inputs of the upstream contract; locations uniform in [lo, hi] (partly off the maps)."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(shapes)
    value = torch.rand(N, S, M, D, generator=g, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64) + 1e-5
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return (value.to(device, dtype), ss.to(device), starts.to(device), loc.to(device, dtype),
            attn.to(device, dtype))


def naive_msda(value, shapes, starts, loc, attn):
    """Bilinear sampling by explicit gathers of the four corners (no grid_sample), in the op's own
    coordinates: pixel centres at (i + 0.5) / size, corners outside the map count as zero."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = value.new_zeros(N, Lq, M, D)
    n_idx = torch.arange(N, device=value.device).view(N, 1, 1, 1)
    m_idx = torch.arange(M, device=value.device).view(1, 1, M, 1)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        x = loc[:, :, :, lvl, :, 0] * w - 0.5  # (N, Lq, M, P)
        y = loc[:, :, :, lvl, :, 1] * h - 0.5
        for cy in (y.floor(), y.floor() + 1):
            for cx in (x.floor(), x.floor() + 1):
                weight = (1 - (x - cx).abs()) * (1 - (y - cy).abs())  # the tent function of this corner
                inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
                row = starts[lvl] + cy.clamp(0, h - 1).long() * w + cx.clamp(0, w - 1).long()
                v = value[n_idx, row, m_idx]  # (N, Lq, M, P, D)
                coef = weight * inside * attn[:, :, :, lvl]
                out = out + (coef[..., None] * v).sum(3)
    return out.flatten(2)


# (N, level shapes (H, W), M heads, D channels, Lq, P points, im2col_step)
CASES = [
    (1, [(6, 4), (3, 2)], 2, 2, 2, 2, 2),                       # upstream detection/ops/test.py
    (3, [(7, 5)], 1, 8, 9, 1, 2),                               # 1 level, 1 point, N % step != 0
    (2, [(5, 9), (4, 3), (2, 7)], 16, 4, 13, 8, 64),            # 16 heads, 8 points, non-square
    (2, [(8, 6), (4, 3), (2, 2), (1, 1)], 8, 33, 17, 4, 64),    # 4 levels with a 1x1 map, odd D
    (5, [(3, 11), (9, 2)], 3, 40, 6, 3, 4),                     # D past one SIMD register + tail
]


@pytest.fixture(scope="module")
def cpu_kernel():
    """The comparisons below are about the compiled kernel: fail (not fall back) if it cannot build."""
    assert build.available("cpu"), "the C++ CPU kernel did not build (see the warning above)"
    return ms_deform_attn


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_gather(case):
    N, shapes, M, D, Lq, P, _ = case
    value, ss, st, loc, attn = make_inputs(N, shapes, M, D, Lq, P)
    a, b = leaves(value, loc, attn), leaves(value, loc, attn)
    ref = ms_deform_attn_pytorch(a[0], ss, st, a[1], a[2])
    naive = naive_msda(b[0], ss, st, b[1], b[2])
    assert (ref - naive).abs().max().item() < 1e-12
    grad = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(ref, a, grad), torch.autograd.grad(naive, b, grad)):
        assert (x - y).abs().max().item() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_cpu_forward_matches_reference(cpu_kernel, case, dtype):
    N, shapes, M, D, Lq, P, step = case
    value, ss, st, loc, attn = make_inputs(N, shapes, M, D, Lq, P, dtype)
    out = cpu_kernel(value, ss, st, loc, attn, im2col_step=step)
    ref = ms_deform_attn_pytorch(value, ss, st, loc, attn)
    assert out.shape == (N, Lq, M * D) and out.dtype == dtype
    err = (out - ref).abs().max().item()
    if dtype == torch.float64:
        assert err < 1e-10
    else:
        assert err < 1e-5 * ref.abs().max().item()
    assert ref.abs().max() > 0.05  # the locations really hit the maps


@pytest.mark.parametrize("case", CASES)
def test_cpu_backward_matches_reference(cpu_kernel, case):
    N, shapes, M, D, Lq, P, step = case
    inputs = make_inputs(N, shapes, M, D, Lq, P, seed=1)
    value, ss, st, loc, attn = inputs
    a, b = leaves(value, loc, attn), leaves(value, loc, attn)
    out = cpu_kernel(a[0], ss, st, a[1], a[2], im2col_step=step)
    ref = ms_deform_attn_pytorch(b[0], ss, st, b[1], b[2])
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for name, x, y in zip(("value", "locations", "weights"), a, b):
        assert (x.grad - y.grad).abs().max().item() < 1e-10 * max(1.0, y.grad.abs().max().item()), name
        assert y.grad.abs().max() > 0, name


@pytest.mark.parametrize("D", [2, 30, 71])
def test_cpu_gradcheck(cpu_kernel, D):
    # upstream's gradcheck setup (shapes (6, 4) and (3, 2), locations in [0, 1)) for a few channel counts
    value, ss, st, loc, attn = make_inputs(1, [(6, 4), (3, 2)], 2, D, 2, 2, lo=0.0, hi=1.0, seed=D)
    value, loc, attn = leaves(value * 0.01, loc, attn)
    assert torch.autograd.gradcheck(lambda v, l, a: cpu_kernel(v, ss, st, l, a, 2), (value, loc, attn),
                                    eps=1e-6, atol=1e-4, rtol=1e-3)


def test_cpu_bfloat16_inputs_computed_in_float32(cpu_kernel):
    value, ss, st, loc, attn = make_inputs(2, [(5, 9), (4, 3)], 4, 16, 7, 4, torch.bfloat16)
    v, l, a = leaves(value, loc, attn)
    out = cpu_kernel(v, ss, st, l, a)
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_pytorch(value.float(), ss, st, loc.float(), attn.float())
    # float32 result rounded once to bfloat16 (8 bits of mantissa)
    assert (out.float() - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item()
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and l.grad.dtype == torch.bfloat16


def test_empty_batch_and_no_queries(cpu_kernel):
    for N, Lq in ((0, 5), (2, 0)):
        value, ss, st, loc, attn = make_inputs(max(N, 1), [(4, 3), (2, 2)], 2, 8, max(Lq, 1), 3)
        value, loc, attn = value[:N], loc[:N, :Lq], attn[:N, :Lq]
        v, l, a = leaves(value, loc, attn)
        out = cpu_kernel(v, ss, st, l, a)
        assert out.shape == (N, Lq, 16)
        out.sum().backward()
        assert v.grad.shape == v.shape and l.grad.shape == l.shape and a.grad.shape == a.shape
        assert v.grad.abs().sum() == 0
        # the kernel itself, past the Python guard
        raw = torch.ops.propetl_msda.ms_deform_attn_forward(value, ss, st, loc, attn)
        assert raw.shape == (N, Lq, 2, 8)


def test_cpu_backward_is_deterministic_and_thread_count_free(cpu_kernel):
    # N * M = 6 heads: one task per head on 1 thread, one per (head, level) on 2 (see backward_kernel)
    value, ss, st, loc, attn = make_inputs(2, [(16, 12), (8, 6)], 3, 32, 300, 4, torch.float32, seed=3)
    grad = torch.randn(2, 300, 96)
    threads = torch.get_num_threads()

    def grads(n_threads):
        torch.set_num_threads(n_threads)
        v, l, a = leaves(value, loc, attn)
        cpu_kernel(v, ss, st, l, a).backward(grad)
        return v.grad, l.grad, a.grad
    try:
        first, second, single = grads(2), grads(2), grads(1)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(first, second, single):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_cpu_kernel_rejects_levels_that_do_not_fit_or_overlap(cpu_kernel):
    value, ss, st, loc, attn = make_inputs(1, [(4, 3), (2, 2)], 2, 4, 3, 2)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.propetl_msda.ms_deform_attn_forward(value, ss * 2, st, loc, attn)
    with pytest.raises(RuntimeError, match="overlap"):
        torch.ops.propetl_msda.ms_deform_attn_forward(value, ss, st * 0, loc, attn)


# ----------------------------------------------------------------------------------------------------
# the module


def module_inputs(N=2, d_model=32, shapes=((6, 8), (3, 4), (2, 2)), Lq=10, seed=0, ref_dims=2):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    query = torch.randn(N, Lq, d_model, generator=g)
    feat = torch.randn(N, int(sizes.sum()), d_model, generator=g)
    if ref_dims == 2:  # ViT-Adapter's form: (1, Lq, 1, 2), broadcast over batch and levels
        ref = torch.rand(1, Lq, 1, 2, generator=g)
    else:  # boxes (cx, cy, w, h) per level
        ref = torch.rand(N, Lq, len(shapes), 4, generator=g) * 0.5 + 0.25
    return query, ref, feat, ss, starts


def randomised(module, seed=0):
    """Non-zero offset/weight projections so that the test exercises more than the init pattern."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_module_with_kernel_equals_module_with_reference(cpu_kernel, monkeypatch, ref_dims):
    torch.manual_seed(0)
    m = randomised(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4, ratio=0.5)).double()
    q, ref, feat, ss, st = [t.double() if t.is_floating_point() else t for t in module_inputs(ref_dims=ref_dims)]
    results = []
    for op in (ms_deform_attn, ms_deform_attn_pytorch):
        monkeypatch.setattr(msda_module, "ms_deform_attn", op)
        m.zero_grad()
        qq, ff = leaves(q, feat)
        out = m(qq, ref, ff, ss, st)
        out.square().sum().backward()
        results.append([out, qq.grad, ff.grad] + [p.grad.clone() for p in m.parameters()])
    for x, y in zip(*results):
        assert (x - y).abs().max().item() < 1e-10
    assert results[0][0].shape == (2, 10, 32)


def test_module_init_pattern():
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=8, n_points=3)
    # head k looks along 2*pi*k/8, scaled so that the larger coordinate is 1; point i at (i+1) times that
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.tensor([1.0, 2.0, 3.0])[None, None, :, None]
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    assert torch.allclose(bias, expected.expand(8, 2, 3, 2), atol=1e-6)
    assert m.sampling_offsets.weight.abs().sum() == 0
    assert m.attention_weights.weight.abs().sum() == 0 and m.attention_weights.bias.abs().sum() == 0
    assert m.value_proj.bias.abs().sum() == 0 and m.output_proj.bias.abs().sum() == 0
    bound = math.sqrt(6 / (64 + 64))  # xavier_uniform
    assert m.value_proj.weight.abs().max() <= bound and m.value_proj.weight.std() > bound / 3
    # names and sizes a ViT-Adapter checkpoint expects (ViT-Adapter-B: d 768, 12 heads, 3 levels, ratio 0.5)
    b = MSDeformAttn(d_model=768, n_levels=3, n_heads=12, n_points=4, ratio=0.5)
    assert {k: tuple(v.shape) for k, v in b.state_dict().items()} == {
        "sampling_offsets.weight": (288, 768), "sampling_offsets.bias": (288,),
        "attention_weights.weight": (144, 768), "attention_weights.bias": (144,),
        "value_proj.weight": (384, 768), "value_proj.bias": (384,),
        "output_proj.weight": (768, 384), "output_proj.bias": (768,)}


def test_module_padding_mask_zeroes_value_rows(cpu_kernel):
    torch.manual_seed(0)
    m = randomised(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4))
    q, ref, feat, ss, st = module_inputs(N=2)
    mask = torch.zeros(2, feat.shape[1], dtype=torch.bool)
    mask[0, 5:30] = True
    mask[1, 50:] = True
    out = m(q, ref, feat, ss, st, mask)
    # padded rows carry no information: replacing them changes nothing ...
    garbage = torch.where(mask[..., None], torch.randn_like(feat) * 100, feat)
    assert torch.allclose(m(q, ref, garbage, ss, st, mask), out, atol=1e-5)
    # ... and the result is the op on value rows set to zero by hand
    value = m.value_proj(feat).masked_fill(mask[..., None], 0).view(2, -1, 4, 8)
    offsets = m.sampling_offsets(q).view(2, 10, 4, 3, 4, 2)
    weights = m.attention_weights(q).view(2, 10, 4, 12).softmax(-1).view(2, 10, 4, 3, 4)
    loc = ref[:, :, None, :, None, :] + offsets / ss.flip(-1)[None, None, None, :, None, :]
    manual = m.output_proj(ms_deform_attn_pytorch(value, ss, st, loc, weights))
    assert torch.allclose(out, manual, atol=1e-5)
    assert not torch.allclose(m(q, ref, feat, ss, st), out, atol=1e-3)


def test_module_rejects_shapes_that_do_not_cover_the_input():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4)
    q, ref, feat, ss, st = module_inputs()
    with pytest.raises(ValueError, match="do not add up"):
        m(q, ref, feat[:, :-1], ss, st)


# ----------------------------------------------------------------------------------------------------
# build failure: one warning and the reference, or an error with MSDA_STRICT=1


def test_fallback_warns_once_and_runs_the_reference(monkeypatch):
    def broken(kind):
        raise RuntimeError("Error building extension 'propetl_msda_cpu':\nfoo.cpp:1:1: error: no compiler here")
    monkeypatch.setattr(build, "_STATE", {})
    monkeypatch.setattr(build, "_build", broken)
    monkeypatch.delenv("MSDA_STRICT", raising=False)
    value, ss, st, loc, attn = make_inputs(2, [(4, 3), (2, 2)], 2, 4, 5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(value, ss, st, loc, attn)
        second = ms_deform_attn(value, ss, st, loc, attn)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0] and "reference" in msgs[0]
    ref = ms_deform_attn_pytorch(value, ss, st, loc, attn)
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_fallback_is_an_error_with_msda_strict(monkeypatch):
    def broken(kind):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(build, "_STATE", {})
    monkeypatch.setattr(build, "_build", broken)
    monkeypatch.setenv("MSDA_STRICT", "1")
    value, ss, st, loc, attn = make_inputs(1, [(4, 3)], 2, 4, 5, 2)
    with pytest.raises(build.MSDABuildError, match="Ninja is required"):
        ms_deform_attn(value, ss, st, loc, attn)


# ----------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_cuda_forward_backward_match_reference(case, dtype):
    assert build.available("cuda"), "the CUDA kernel did not build (see the warning above)"
    N, shapes, M, D, Lq, P, step = case
    value, ss, st, loc, attn = make_inputs(N, shapes, M, D, Lq, P, dtype, device="cuda", seed=2)
    a, b = leaves(value, loc, attn), leaves(value.double(), loc.double(), attn.double())
    out = ms_deform_attn(a[0], ss, st, a[1], a[2], im2col_step=step)
    ref = ms_deform_attn_pytorch(b[0], ss, st, b[1], b[2])
    f64 = dtype == torch.float64
    assert (out.double() - ref).abs().max().item() < (1e-10 if f64 else 1e-5) * max(1.0, ref.abs().max().item())
    grad = torch.randn(out.shape, dtype=dtype, device="cuda")
    out.backward(grad)
    ref.backward(grad.double())
    for name, x, y in zip(("value", "locations", "weights"), a, b):
        scale = max(1.0, y.grad.abs().max().item())
        assert (x.grad.double() - y.grad).abs().max().item() < (1e-9 if f64 else 1e-4) * scale, name


@CUDA
def test_cuda_gradcheck():
    assert build.available("cuda")
    for D in (2, 30, 71):
        value, ss, st, loc, attn = make_inputs(1, [(6, 4), (3, 2)], 2, D, 2, 2, device="cuda", lo=0.0, hi=1.0)
        value, loc, attn = leaves(value * 0.01, loc, attn)
        assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, ss, st, l, a, 2), (value, loc, attn),
                                        eps=1e-6, atol=1e-4, rtol=1e-3, nondet_tol=1e-12)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs_computed_in_float32(dtype):
    assert build.available("cuda")
    value, ss, st, loc, attn = make_inputs(2, [(16, 12), (8, 6), (4, 3)], 8, 32, 50, 4, dtype, device="cuda")
    v, l, a = leaves(value, loc, attn)
    out = ms_deform_attn(v, ss, st, l, a)
    assert out.dtype == dtype
    ref = ms_deform_attn_pytorch(value.double(), ss, st, loc.double(), attn.double())
    eps = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    assert (out.double() - ref).abs().max().item() <= 2 * eps * ref.abs().max().item()
    grad = torch.randn(out.shape, device="cuda").to(dtype)
    out.backward(grad)
    assert v.grad.dtype == dtype and l.grad.dtype == dtype and a.grad.dtype == dtype
    vr, lr, ar = leaves(value.double(), loc.double(), attn.double())
    ms_deform_attn_pytorch(vr, ss, st, lr, ar).backward(grad.double())
    # value and weight gradients are sums of products of rounded inputs: a few half-precision ulps
    for x, y in ((v.grad, vr.grad), (a.grad, ar.grad)):
        assert (x.double() - y).abs().max().item() <= 8 * eps * y.abs().max().item()
