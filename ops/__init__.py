"""Multi-scale deformable attention (Deformable-DETR, used by ViT-Adapter), with real CPU and CUDA kernels.

    from ops import ms_deform_attn, ms_deform_attn_pytorch, MSDeformAttn

Contract (upstream's ``MSDeformAttnFunction.apply``, Deformable-DETR ``models/ops``):

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64) -> (N, Lq, M * D)

    value               (N, S, M, D)          S = sum_l H_l * W_l, level l at rows [start_l, start_l + H_l W_l)
    spatial_shapes      (L, 2) int64          (H_l, W_l)
    level_start_index   (L,) int64
    sampling_locations  (N, Lq, M, L, P, 2)   normalised (x, y) in [0, 1]; outside is allowed (zero padding)
    attention_weights   (N, Lq, M, L, P)      used as given (the module applies the softmax)

    out[n, q, m] = sum_{l, p} A[n, q, m, l, p] * bilinear(V_l[n, :, :, m], x = loc_x W_l - 0.5, y = loc_y H_l - 0.5)

i.e. ``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`` with grid = 2 loc - 1,
which is what ``ms_deform_attn_pytorch`` (the reference) computes. Gradients flow to value, locations
and weights. ``im2col_step`` is accepted and ignored: no batch chunking is needed, any N works.

Kernels. Upstream's CPU path is a stub ("Not implemented on the CPU") and its CUDA op must be built by
hand. Here:
- CPU tensors (float32, float64) run a C++ kernel (``csrc/ms_deform_attn_cpu.cpp``) parallel over
  ``at::parallel_for``; its backward is deterministic (no atomics: each thread owns a (batch, head)
  slice of grad_value). half / bfloat16 CPU inputs are computed in float32 and cast back.
- CUDA tensors (float32, float64, half, bfloat16; the half types accumulate in float32) run
  ``csrc/ms_deform_attn_cuda.cu``; its backward accumulates grad_value with atomicAdd (not bit-reproducible).
- Other devices run the reference.

Build. The kernels are compiled on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja are needed; the CPU build takes seconds, one line on stderr says so) into a cache folder,
then loaded from there by every later process. The CUDA kernels are compiled only where a GPU is
visible (or when asked), with CUDA_HOME, the wheel-shipped CUDA headers and the GPU's architecture
found automatically. If a build fails, one warning gives the compiler's first error lines and the
reference runs instead. ``python -m ops`` prebuilds (strict: a failure is an error).

Environment variables:
    MSDA_BUILD_DIR    cache folder (default ``~/.cache/propetl_ops/<torch version>``)
    MSDA_BUILD_CUDA   1: build the CUDA kernels even without a visible GPU; 0: never build them
    MSDA_STRICT       1: a failed build raises ``ops.build.MSDABuildError`` instead of falling back
"""
from .msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "MSDeformAttn"]
