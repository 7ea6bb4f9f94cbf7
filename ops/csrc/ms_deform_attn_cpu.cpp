// Multi-scale deformable attention, CPU forward and backward (float32, float64).
//
// Faithful to the maths of Deformable-DETR's `ms_deform_attn_cuda` kernels (fundamentalvision/
// Deformable-DETR, models/ops/src/cuda/ms_deform_im2col_cuda.cuh), whose own CPU file only raises
// "Not implement on cpu". Every sample is bilinear with align_corners=False and zero padding:
//   x = loc_x * W_l - 0.5,  y = loc_y * H_l - 0.5,  corners outside the map contribute 0,
// which is F.grid_sample(..., 'bilinear', 'zeros', align_corners=False) with grid = 2 * loc - 1.
//
// Layout (all contiguous):
//   value            (N, S, M, D)        S = sum_l H_l * W_l, D = channels per head
//   spatial_shapes   (L, 2) int64        (H_l, W_l)
//   level_start      (L,)   int64        first row of level l in S
//   sampling_loc     (N, Lq, M, L, P, 2) normalised (x, y)
//   attn_weight      (N, Lq, M, L, P)
//   output           (N, Lq, M, D)       the caller views it as (N, Lq, M * D)
//
// Parallelism. The forward runs over (n, q): every output row belongs to one task. The backward runs
// over (n, m, l): a task owns the slice grad_value[n, rows of level l, m, :] and the grad_loc /
// grad_attn entries of that head and level, so no two threads ever write the same element and every
// sum is taken in the same order on every run: the CPU backward is deterministic without atomics and
// independent of the number of threads. The inner loops run over the D contiguous channels of a pixel
// (one value "row").
//
// The op is registered with the dispatcher as propetl_msda::ms_deform_attn_forward / _backward; the
// CUDA extension (ms_deform_attn_cuda.cu) adds its kernels to the same schema.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

struct Level {
  int64_t h, w, start;  // map height and width, first row in S
};

// Reads the (tiny) level tables once per call and checks them against S, so that a wrong
// spatial_shapes / level_start_index fails with a message instead of reading outside `value`.
std::vector<Level> read_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t L, int64_t S) {
  TORCH_CHECK(shapes.device().is_cpu() && starts.device().is_cpu(),
              "ms_deform_attn (CPU): spatial_shapes and level_start_index must be CPU tensors");
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == L && shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", L, ", got ", shapes.sizes());
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", L, ", got ", starts.sizes());
  const at::Tensor sh = shapes.contiguous(), st = starts.contiguous();
  const int64_t* s = sh.data_ptr<int64_t>();
  const int64_t* b = st.data_ptr<int64_t>();
  std::vector<Level> lv(L);
  for (int64_t l = 0; l < L; ++l) {
    lv[l] = {s[2 * l], s[2 * l + 1], b[l]};
    TORCH_CHECK(lv[l].h > 0 && lv[l].w > 0 && lv[l].start >= 0 && lv[l].start + lv[l].h * lv[l].w <= S,
                "ms_deform_attn: level ", l, " (H=", lv[l].h, ", W=", lv[l].w, ", start=", lv[l].start,
                ") does not fit in value with S = ", S, " rows");
  }
  // the backward gives each (n, m, level) its own rows of grad_value: the levels must not overlap
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = i + 1; j < L; ++j)
      TORCH_CHECK(lv[i].start + lv[i].h * lv[i].w <= lv[j].start || lv[j].start + lv[j].h * lv[j].w <= lv[i].start,
                  "ms_deform_attn: levels ", i, " and ", j, " overlap in value (level_start_index ", lv[i].start,
                  " and ", lv[j].start, ")");
  return lv;
}

// The four bilinear corners of one sample. Corner c in (00, 01, 10, 11) = (y0x0, y0x1, y1x0, y1x1);
// `off` is the row offset in S inside the level, `w` the bilinear weight (attention not included).
template <typename T>
struct Corners {
  int64_t off[4];
  T w[4];
  bool ok[4];
  bool interior;  // all four corners inside the map (the common case: one fused loop)
  T fx, fy;       // fractional parts, for the location gradient
};

// Returns false when the sample lies entirely outside the map (y <= -1, y >= H, x <= -1 or x >= W, or
// NaN): then every corner is padding and neither the output nor any gradient receives anything.
template <typename T>
inline bool corners(T loc_x, T loc_y, const Level& g, Corners<T>& c) {
  const T x = loc_x * static_cast<T>(g.w) - T(0.5);
  const T y = loc_y * static_cast<T>(g.h) - T(0.5);
  if (!(x > T(-1) && y > T(-1) && x < static_cast<T>(g.w) && y < static_cast<T>(g.h))) return false;
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  c.fx = x - xf;
  c.fy = y - yf;
  const T gx = T(1) - c.fx, gy = T(1) - c.fy;
  c.w[0] = gy * gx;
  c.w[1] = gy * c.fx;
  c.w[2] = c.fy * gx;
  c.w[3] = c.fy * c.fx;
  const bool okx0 = x0 >= 0, okx1 = x1 < g.w, oky0 = y0 >= 0, oky1 = y1 < g.h;
  c.ok[0] = oky0 && okx0;
  c.ok[1] = oky0 && okx1;
  c.ok[2] = oky1 && okx0;
  c.ok[3] = oky1 && okx1;
  c.interior = c.ok[0] && c.ok[3];
  c.off[0] = y0 * g.w + x0;
  c.off[1] = c.off[0] + 1;
  c.off[2] = c.off[0] + g.w;
  c.off[3] = c.off[2] + 1;
  return true;
}

// Channel loops use GCC / Clang vector extensions: K lanes of one 32-byte register (AVX2 when built
// with -mavx2, two SSE halves otherwise), loaded and stored unaligned. Dot products keep K partial
// sums and add them in a fixed order: vectorised without -ffast-math, and reproducible.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int K = 32 / sizeof(T);
  static inline V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  // pairwise (tree) sum of the lanes: a short dependency chain, in a fixed order
  static inline T sum(V v) {
    T t[K];
    __builtin_memcpy(t, &v, sizeof(V));
    for (int w = K / 2; w >= 1; w /= 2)
      for (int k = 0; k < w; ++k) t[k] += t[k + w];
    return t[0];
  }
};

// o += w0 v0 + w1 v1 + w2 v2 + w3 v3 (the four corners of an interior sample)
template <typename T>
inline void axpy4(T* o, const T* v0, const T* v1, const T* v2, const T* v3, T w0, T w1, T w2, T w3,
                  int64_t D) {
  using S = Simd<T>;
  int64_t d = 0;
  for (; d + S::K <= D; d += S::K)
    S::store(o + d, S::load(o + d) + w0 * S::load(v0 + d) + w1 * S::load(v1 + d) + w2 * S::load(v2 + d) +
                        w3 * S::load(v3 + d));
  for (; d < D; ++d) o[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}

// y += alpha x
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t D) {
  using S = Simd<T>;
  int64_t d = 0;
  for (; d + S::K <= D; d += S::K) S::store(y + d, S::load(y + d) + alpha * S::load(x + d));
  for (; d < D; ++d) y[d] += alpha * x[d];
}

// <g, x>
template <typename T>
inline T dot(const T* g, const T* x, int64_t D) {
  using S = Simd<T>;
  typename S::V acc = {};
  int64_t d = 0;
  for (; d + S::K <= D; d += S::K) acc += S::load(g + d) * S::load(x + d);
  T r = S::sum(acc);
  for (; d < D; ++d) r += g[d] * x[d];
  return r;
}

// The backward of one interior sample in a single pass over the channels: s[k] = <g, v_k> for the four
// corner rows v_k, and gv_k += w_k g for their gradient rows (four distinct rows, so no aliasing).
template <typename T>
inline void corner_grads4(const T* g, const T* v0, const T* v1, const T* v2, const T* v3, T* gv0, T* gv1,
                          T* gv2, T* gv3, T w0, T w1, T w2, T w3, int64_t D, T s[4]) {
  using S = Simd<T>;
  typename S::V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t d = 0;
  for (; d + S::K <= D; d += S::K) {
    const typename S::V gd = S::load(g + d);
    a0 += gd * S::load(v0 + d);
    a1 += gd * S::load(v1 + d);
    a2 += gd * S::load(v2 + d);
    a3 += gd * S::load(v3 + d);
    S::store(gv0 + d, S::load(gv0 + d) + w0 * gd);
    S::store(gv1 + d, S::load(gv1 + d) + w1 * gd);
    S::store(gv2 + d, S::load(gv2 + d) + w2 * gd);
    S::store(gv3 + d, S::load(gv3 + d) + w3 * gd);
  }
  s[0] = S::sum(a0);
  s[1] = S::sum(a1);
  s[2] = S::sum(a2);
  s[3] = S::sum(a3);
  for (; d < D; ++d) {
    const T gd = g[d];
    s[0] += gd * v0[d];
    s[1] += gd * v1[d];
    s[2] += gd * v2[d];
    s[3] += gd * v3[d];
    gv0[d] += w0 * gd;
    gv1[d] += w1 * gd;
    gv2[d] += w2 * gd;
    gv3[d] += w3 * gd;
  }
}

template <typename T>
void forward_kernel(const T* value, const std::vector<Level>& lv, const T* loc, const T* attn, T* out,
                    int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t row = M * D;  // stride between two pixels of one head in `value`
  const int64_t LP = L * P;
  // ~4k samples per task keeps the scheduling overhead negligible even for tiny D
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * LP));
  at::parallel_for(0, N * Lq, grain, [&](int64_t begin, int64_t end) {
    Corners<T> c;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Lq;
      for (int64_t m = 0; m < M; ++m) {
        T* o = out + (nq * M + m) * D;
        const T* vhead = value + (n * S * M + m) * D;  // value[n, 0, m, :]
        const T* a_ptr = attn + (nq * M + m) * LP;
        const T* l_ptr = loc + (nq * M + m) * LP * 2;
        for (int64_t l = 0; l < L; ++l) {
          const Level& g = lv[l];
          const T* vl = vhead + g.start * row;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = l * P + p;
            if (!corners(l_ptr[2 * i], l_ptr[2 * i + 1], g, c)) continue;
            const T a = a_ptr[i];
            if (c.interior) {
              axpy4(o, vl + c.off[0] * row, vl + c.off[1] * row, vl + c.off[2] * row, vl + c.off[3] * row,
                    a * c.w[0], a * c.w[1], a * c.w[2], a * c.w[3], D);
            } else {
              for (int k = 0; k < 4; ++k)
                if (c.ok[k]) axpy(a * c.w[k], vl + c.off[k] * row, o, D);
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* value, const std::vector<Level>& lv, const T* loc, const T* attn,
                     const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t N, int64_t S,
                     int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t row = M * D;
  const int64_t LP = L * P;
  // A task is one (n, m), or one (n, m, level) when there are few heads for the threads: it alone
  // writes grad_value[n, rows of its levels, m, :] (levels do not overlap, read_levels checks it) and
  // the grad_loc / grad_attn entries of its samples. Either way every grad_value element receives its
  // terms in the order (q, p), so the result is the same bit for bit.
  const bool per_level = L > 1 && N * M < 4 * at::get_num_threads();
  const int64_t tasks = per_level ? N * M * L : N * M;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Corners<T> c;
    T s[4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nm = per_level ? task / L : task;
      const int64_t n = nm / M, m = nm % M;
      const int64_t l_begin = per_level ? task % L : 0, l_end = per_level ? l_begin + 1 : L;
      const T* vhead = value + (n * S * M + m) * D;
      T* gvhead = grad_value + (n * S * M + m) * D;
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t nqm = (n * Lq + q) * M + m;
        const T* go = grad_out + nqm * D;
        const T* a_ptr = attn + nqm * LP;
        const T* l_ptr = loc + nqm * LP * 2;
        T* ga_ptr = grad_attn + nqm * LP;
        T* gl_ptr = grad_loc + nqm * LP * 2;
        for (int64_t l = l_begin; l < l_end; ++l) {
          const Level& g = lv[l];
          const T* vl = vhead + g.start * row;
          T* gvl = gvhead + g.start * row;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = l * P + p;
            if (!corners(l_ptr[2 * i], l_ptr[2 * i + 1], g, c)) continue;  // grads stay 0
            const T a = a_ptr[i];
            // s[k] = <grad_out, value at corner k>, 0 for a padding corner; grad_value += a w_k grad_out
            if (c.interior) {
              corner_grads4(go, vl + c.off[0] * row, vl + c.off[1] * row, vl + c.off[2] * row,
                            vl + c.off[3] * row, gvl + c.off[0] * row, gvl + c.off[1] * row,
                            gvl + c.off[2] * row, gvl + c.off[3] * row, a * c.w[0], a * c.w[1], a * c.w[2],
                            a * c.w[3], D, s);
            } else {
              for (int k = 0; k < 4; ++k) {
                s[k] = T(0);
                if (!c.ok[k]) continue;
                s[k] = dot(go, vl + c.off[k] * row, D);
                axpy(a * c.w[k], go, gvl + c.off[k] * row, D);
              }
            }
            ga_ptr[i] = c.w[0] * s[0] + c.w[1] * s[1] + c.w[2] * s[2] + c.w[3] * s[3];
            // d(bilinear)/dx = (1-fy)(v01-v00) + fy(v11-v10), and dx/dloc_x = W (same for y with H)
            const T gx = T(1) - c.fx, gy = T(1) - c.fy;
            gl_ptr[2 * i] = a * static_cast<T>(g.w) * (gy * (s[1] - s[0]) + c.fy * (s[3] - s[2]));
            gl_ptr[2 * i + 1] = a * static_cast<T>(g.h) * (gx * (s[2] - s[0]) + c.fx * (s[3] - s[1]));
          }
        }
      }
    }
  });
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

Dims check_inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", loc.sizes());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
  TORCH_CHECK(loc.size(0) == d.N && loc.size(2) == d.M,
              "ms_deform_attn: sampling_locations ", loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == d.N && attn.size(1) == d.Lq && attn.size(2) == d.M &&
                  attn.size(3) == d.L && attn.size(4) == d.P,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", d.N, ", ", d.Lq, ", ", d.M,
              ", ", d.L, ", ", d.P, "), got ", attn.sizes());
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype");
  TORCH_CHECK(value.is_contiguous() && loc.is_contiguous() && attn.is_contiguous(),
              "ms_deform_attn: inputs must be contiguous");
  return d;
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight) {
  const Dims d = check_inputs(value, sampling_loc, attn_weight);
  const std::vector<Level> lv = read_levels(spatial_shapes, level_start_index, d.L, d.S);
  at::Tensor out = at::zeros({d.N, d.Lq, d.M, d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), lv, sampling_loc.data_ptr<scalar_t>(),
                             attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d.N, d.S, d.M, d.D,
                             d.Lq, d.L, d.P);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const Dims d = check_inputs(value, sampling_loc, attn_weight);
  const std::vector<Level> lv = read_levels(spatial_shapes, level_start_index, d.L, d.S);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.numel() == d.N * d.Lq * d.M * d.D,
              "ms_deform_attn: grad_output must be a contiguous (N, Lq, M * D) tensor of value's dtype");
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_loc);
  at::Tensor grad_attn = at::zeros_like(attn_weight);
  if (grad_output.numel() == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), lv, sampling_loc.data_ptr<scalar_t>(),
                              attn_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>(), d.N, d.S, d.M, d.D, d.Lq, d.L, d.P);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY(propetl_msda, m) {
  m.def("ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_loc, Tensor attn_weight) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_loc, Tensor attn_weight, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(propetl_msda, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}
