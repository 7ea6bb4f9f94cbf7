// Multi-scale deformable attention, CUDA forward and backward (float32, float64, half, bfloat16).
//
// In the spirit of Deformable-DETR's kernels (fundamentalvision/Deformable-DETR,
// models/ops/src/cuda/ms_deform_im2col_cuda.cuh): one thread per output element and channel, the same
// sampling maths as the CPU kernel (ms_deform_attn_cpu.cpp, which documents the layouts), and
// atomicAdd for grad_value. half and bfloat16 inputs are read as they are and computed in float32
// (at::opmath_type); their grad_value is accumulated in a float32 buffer and cast back at the end.
//
// Backward: a "group" of G lanes (G = the power of two >= D, at most 32, so a group never spans two
// warps) serves one (n, q, m); lane j handles channels j, j + G, ... Each lane forms its share of the
// three per-sample sums (grad_attn, grad_loc x and y), the group adds them with warp shuffles, and
// its first lane writes them: no atomics and no shared memory for those. The grad_value atomics are
// the one source of run-to-run variation (float addition order), as upstream.
//
// Registered as the CUDA kernels of the propetl_msda::ms_deform_attn_forward / _backward schema that
// the CPU extension defines (load that one first).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kThreads = 256;

// Level table (H, W, start) copied to shared memory once per block: read by every sample.
__device__ __forceinline__ void load_levels(const int64_t* shapes, const int64_t* starts, int L,
                                            int64_t* lvl) {
  for (int i = threadIdx.x; i < L; i += blockDim.x) {
    lvl[3 * i] = shapes[2 * i];
    lvl[3 * i + 1] = shapes[2 * i + 1];
    lvl[3 * i + 2] = starts[i];
  }
  __syncthreads();
}

template <typename acc_t>
struct Sample {
  int64_t x0, y0;
  acc_t fx, fy;
};

// False when the sample falls entirely outside the map (all corners are zero padding) or is NaN.
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t lx, acc_t ly, int64_t H, int64_t W, Sample<acc_t>& s) {
  const acc_t x = lx * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = ly * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) return false;
  const acc_t xf = floor(x), yf = floor(y);
  s.x0 = static_cast<int64_t>(xf);
  s.y0 = static_cast<int64_t>(yf);
  s.fx = x - xf;
  s.fy = y - yf;
  return true;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t total,
                               int64_t S, int M, int D, int64_t Lq, int L, int P) {
  extern __shared__ int64_t lvl[];
  load_levels(shapes, starts, L, lvl);
  const int64_t row = static_cast<int64_t>(M) * D;  // stride between two pixels of one head
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // idx = ((n * Lq + q) * M + m) * D + d, the output's own layout
    const int d = idx % D;
    const int64_t nqm = idx / D;
    const int m = nqm % M;
    const int64_t n = nqm / M / Lq;
    const scalar_t* vhead = value + (n * S * M + m) * D + d;
    const scalar_t* a_ptr = attn + nqm * L * P;
    const scalar_t* l_ptr = loc + nqm * L * P * 2;
    acc_t acc = 0;
    for (int l = 0; l < L; ++l) {
      const int64_t H = lvl[3 * l], W = lvl[3 * l + 1];
      const scalar_t* vl = vhead + lvl[3 * l + 2] * row;
      for (int p = 0; p < P; ++p) {
        const int i = l * P + p;
        Sample<acc_t> s;
        if (!locate(static_cast<acc_t>(l_ptr[2 * i]), static_cast<acc_t>(l_ptr[2 * i + 1]), H, W, s)) continue;
        const acc_t gx = acc_t(1) - s.fx, gy = acc_t(1) - s.fy;
        acc_t v = 0;
        if (s.y0 >= 0) {
          if (s.x0 >= 0) v += gy * gx * static_cast<acc_t>(vl[(s.y0 * W + s.x0) * row]);
          if (s.x0 + 1 < W) v += gy * s.fx * static_cast<acc_t>(vl[(s.y0 * W + s.x0 + 1) * row]);
        }
        if (s.y0 + 1 < H) {
          if (s.x0 >= 0) v += s.fy * gx * static_cast<acc_t>(vl[((s.y0 + 1) * W + s.x0) * row]);
          if (s.x0 + 1 < W) v += s.fy * s.fx * static_cast<acc_t>(vl[((s.y0 + 1) * W + s.x0 + 1) * row]);
        }
        acc += static_cast<acc_t>(a_ptr[i]) * v;
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, G);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t groups, int G, int64_t padded,
                                int64_t S, int M, int D, int64_t Lq, int L, int P) {
  extern __shared__ int64_t lvl[];
  load_levels(shapes, starts, L, lvl);
  const int64_t row = static_cast<int64_t>(M) * D;
  // `padded` and the stride are multiples of 32: the lanes of a warp run the same iterations, which
  // the shuffles need. Lanes past the last group (or past D) compute zeros and write nothing.
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < padded;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t nqm = t / G;  // (n * Lq + q) * M + m
    const int lane = t % G;
    const bool active = nqm < groups;
    const int m = active ? nqm % M : 0;
    const int64_t n = active ? nqm / M / Lq : 0;
    const int64_t head = (n * S * M + m) * D;
    const scalar_t* go = grad_out + (active ? nqm : 0) * D;
    for (int l = 0; l < L; ++l) {
      const int64_t H = lvl[3 * l], W = lvl[3 * l + 1], base = head + lvl[3 * l + 2] * row;
      for (int p = 0; p < P; ++p) {
        const int64_t i = (active ? nqm : 0) * L * P + l * P + p;
        Sample<acc_t> s;
        acc_t a = 0, sum_a = 0, sum_x = 0, sum_y = 0;
        const bool in = active && locate(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, s);
        if (in) {
          a = static_cast<acc_t>(attn[i]);
          const acc_t gx = acc_t(1) - s.fx, gy = acc_t(1) - s.fy;
          const bool oy0 = s.y0 >= 0, oy1 = s.y0 + 1 < H, ox0 = s.x0 >= 0, ox1 = s.x0 + 1 < W;
          const int64_t r00 = base + (s.y0 * W + s.x0) * row, r01 = r00 + row, r10 = r00 + W * row,
                        r11 = r10 + row;
          const acc_t w00 = gy * gx, w01 = gy * s.fx, w10 = s.fy * gx, w11 = s.fy * s.fx;
          for (int d = lane; d < D; d += G) {
            const acc_t g = static_cast<acc_t>(go[d]);
            const acc_t v00 = oy0 && ox0 ? static_cast<acc_t>(value[r00 + d]) : acc_t(0);
            const acc_t v01 = oy0 && ox1 ? static_cast<acc_t>(value[r01 + d]) : acc_t(0);
            const acc_t v10 = oy1 && ox0 ? static_cast<acc_t>(value[r10 + d]) : acc_t(0);
            const acc_t v11 = oy1 && ox1 ? static_cast<acc_t>(value[r11 + d]) : acc_t(0);
            sum_a += g * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
            sum_x += g * (gy * (v01 - v00) + s.fy * (v11 - v10));
            sum_y += g * (gx * (v10 - v00) + s.fx * (v11 - v01));
            const acc_t ag = a * g;
            if (oy0 && ox0) atomicAdd(grad_value + r00 + d, w00 * ag);
            if (oy0 && ox1) atomicAdd(grad_value + r01 + d, w01 * ag);
            if (oy1 && ox0) atomicAdd(grad_value + r10 + d, w10 * ag);
            if (oy1 && ox1) atomicAdd(grad_value + r11 + d, w11 * ag);
          }
        }
        // every lane of the warp takes part in the shuffles, in or out
        sum_a = group_sum(sum_a, G);
        sum_x = group_sum(sum_x, G);
        sum_y = group_sum(sum_y, G);
        if (in && lane == 0) {
          grad_attn[i] = static_cast<scalar_t>(sum_a);
          grad_loc[2 * i] = static_cast<scalar_t>(a * static_cast<acc_t>(W) * sum_x);
          grad_loc[2 * i + 1] = static_cast<scalar_t>(a * static_cast<acc_t>(H) * sum_y);
        }
      }
    }
  }
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

Dims check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                  const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.is_cuda() && shapes.is_cuda() && starts.is_cuda() && loc.is_cuda() && attn.is_cuda(),
              "ms_deform_attn (CUDA): all inputs must be CUDA tensors");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", loc.sizes());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
  TORCH_CHECK(loc.size(0) == d.N && loc.size(2) == d.M,
              "ms_deform_attn: sampling_locations ", loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == d.N && attn.size(1) == d.Lq && attn.size(2) == d.M &&
                  attn.size(3) == d.L && attn.size(4) == d.P,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ", attn.sizes());
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong && shapes.dim() == 2 &&
                  shapes.size(0) == d.L && shapes.size(1) == 2 && starts.numel() == d.L,
              "ms_deform_attn: spatial_shapes must be (L, 2) and level_start_index (L,), int64, L = ", d.L);
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype");
  TORCH_CHECK(value.is_contiguous() && loc.is_contiguous() && attn.is_contiguous() && shapes.is_contiguous() &&
                  starts.is_contiguous(),
              "ms_deform_attn: inputs must be contiguous");
  TORCH_CHECK(d.M <= INT32_MAX && d.D <= INT32_MAX && d.L * d.P <= INT32_MAX, "ms_deform_attn: sizes too large");
  return d;
}

int64_t blocks_for(int64_t threads) {
  // a grid-stride loop covers the rest; 2^20 blocks are plenty to fill any GPU
  return std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, int64_t(1) << 20));
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({d.N, d.Lq, d.M, d.D}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const size_t shm = 3 * d.L * sizeof(int64_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, shm, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_loc.data_ptr<scalar_t>(), attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, d.S,
        static_cast<int>(d.M), static_cast<int>(d.D), d.Lq, static_cast<int>(d.L), static_cast<int>(d.P));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  TORCH_CHECK(grad_output.is_cuda() && grad_output.is_contiguous() &&
                  grad_output.scalar_type() == value.scalar_type() && grad_output.numel() == d.N * d.Lq * d.M * d.D,
              "ms_deform_attn: grad_output must be a contiguous (N, Lq, M * D) CUDA tensor of value's dtype");
  const c10::cuda::CUDAGuard guard(value.device());
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // half / bfloat16: atomics into a float32 buffer, then one cast (half atomics would lose the sum)
  at::Tensor grad_value_acc = at::zeros_like(value, value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  at::Tensor grad_loc = at::zeros_like(sampling_loc);
  at::Tensor grad_attn = at::zeros_like(attn_weight);
  const int64_t groups = d.N * d.Lq * d.M;
  if (groups > 0 && d.D > 0) {
    int G = 1;
    while (G < d.D && G < 32) G *= 2;
    const int64_t padded = (groups * G + 31) / 32 * 32;
    const size_t shm = 3 * d.L * sizeof(int64_t);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for(padded), kThreads, shm, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_loc.data_ptr<scalar_t>(), attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), groups, G,
          padded, d.S, static_cast<int>(d.M), static_cast<int>(d.D), d.Lq, static_cast<int>(d.L),
          static_cast<int>(d.P));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(propetl_msda, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}
