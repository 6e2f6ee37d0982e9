// The SSIP pass's element-wise steps on the CPU, outside autograd and in training's step, as
// kernels that read the coefficient rows once (robnet_svc/bounds/native.py says when they run and why):
//
// - bounds_of_rows: the bounds over the box of the lower and upper equations;
// - half_sums: the next rows after an activation with non-negative slopes;
// - relu_step: the whole step at a ReLU (bounds, intersection, relaxation, next rows);
// - clip_layer, scaled_rows: the clipping layer in front of the network, per pixel;
// - slope_grads, row_grads: training's backward of the step (its forward is bounds_of_rows
//   and half_sums).
//
// Layout: the centre rows c and radius rows r are [B, K, N] (sample, coefficient, neuron; the
// neurons in memory order), contiguous; node tensors are [B, N]; the box is mid, rad [B, K].
// Lo = c - r and Up = c + r are the rows of the lower and upper equations.
//
// Plain IEEE arithmetic, no -ffast-math: the results equal the engine's PyTorch ops up to the
// summation order of the K-term sums and the contraction of a product and a sum into one
// rounding (robnet_svc/rounding.py: its analysis holds for either). Every loop below is a
// simple loop over neurons with restrict-qualified pointers, so that the compiler vectorises it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

void check_rows(const torch::Tensor& c, const torch::Tensor& r) {
  TORCH_CHECK(c.device().is_cpu() && r.device().is_cpu(), "rows must be on the CPU");
  TORCH_CHECK(c.dim() == 3 && c.sizes() == r.sizes(), "rows must be [B, K, N] and alike");
  TORCH_CHECK(c.is_contiguous() && r.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(c.scalar_type() == r.scalar_type(), "rows must share a dtype");
  TORCH_CHECK(c.scalar_type() == torch::kFloat || c.scalar_type() == torch::kDouble, "rows must be float32 or float64");
}

void check_node(const torch::Tensor& t, const torch::Tensor& like, int64_t width, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == width && t.is_contiguous() &&
                  t.scalar_type() == like.scalar_type() && t.device().is_cpu(),
              what, " must be contiguous [B, ", width, "] of the rows' dtype on the CPU");
}

// max(x, 0) and min(x, 0) that keep a NaN (torch.relu does): a bound that is NaN must stay
// unknown, never become 0. The sign of a zero may differ from torch's.
template <typename T>
inline T positive_part(T x) {
  return x < 0 ? T(0) : x;
}

template <typename T>
inline T negative_part(T x) {
  return x > 0 ? T(0) : x;
}

// Samples per task of at::parallel_for: at least PyTorch's grain of element-wise work, so that
// small tensors run on the calling thread, as PyTorch's own ops do.
inline int64_t grain(int64_t per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_item));
}

// std::max / std::min: a unless b is larger (smaller). A NaN b leaves a; a NaN a stays.
template <typename T>
inline T larger(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
inline T smaller(T a, T b) {
  return b < a ? b : a;
}

// lo += m Lo_k - q |Lo_k|, up += m Up_k + q |Up_k| for one coefficient row k of one sample.
template <typename T>
void add_row_bounds(int64_t n, T m, T q, const T* __restrict__ ck, const T* __restrict__ rk, T* __restrict__ lo,
                    T* __restrict__ up) {
  for (int64_t i = 0; i < n; ++i) {
    const T l = ck[i] - rk[i], u = ck[i] + rk[i];
    lo[i] += m * l - q * std::abs(l);
    up[i] += m * u + q * std::abs(u);
  }
}

// centre' = hu Up_k + hl Lo_k, radius' = hu Up_k - hl Lo_k for one row.
template <typename T>
void half_sums_row(int64_t n, const T* __restrict__ hl, const T* __restrict__ hu, const T* __restrict__ ck,
                   const T* __restrict__ rk, T* __restrict__ oc, T* __restrict__ orad) {
  for (int64_t i = 0; i < n; ++i) {
    const T hu_up = hu[i] * (ck[i] + rk[i]), hl_lo = hl[i] * (ck[i] - rk[i]);
    oc[i] = hu_up + hl_lo;
    orad[i] = hu_up - hl_lo;
  }
}

// [lo, up] = [const_c - const_r, const_c + const_r]: the equations' constants, where the sums start.
template <typename T>
void start_bounds(int64_t n, const T* __restrict__ cc, const T* __restrict__ rc, T* __restrict__ lo,
                  T* __restrict__ up) {
  for (int64_t i = 0; i < n; ++i) {
    lo[i] = cc[i] - rc[i];
    up[i] = cc[i] + rc[i];
  }
}

// [lo, up] ∩ the interval (a, b): its bounds, or (mid_rad) its centre and radius.
template <typename T>
void intersect_interval(int64_t n, bool mid_rad, const T* __restrict__ a, const T* __restrict__ b,
                        T* __restrict__ lo, T* __restrict__ up) {
  if (mid_rad) {
    for (int64_t i = 0; i < n; ++i) {
      lo[i] = larger(a[i] - b[i], lo[i]);
      up[i] = smaller(a[i] + b[i], up[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      lo[i] = larger(a[i], lo[i]);
      up[i] = smaller(b[i], up[i]);
    }
  }
}

// [lo, up] ∩ [tl, tu] (the tighter bounds a caller holds).
template <typename T>
void intersect_bounds(int64_t n, const T* __restrict__ tl, const T* __restrict__ tu, T* __restrict__ lo,
                      T* __restrict__ up) {
  for (int64_t i = 0; i < n; ++i) {
    lo[i] = larger(lo[i], tl[i]);
    up[i] = smaller(up[i], tu[i]);
  }
}

// The ReLU relaxation on [l, u] (robnet_svc/bounds/ops/relu.py, relu_relaxation, op for op):
// l- = min(l, 0), u+ = max(u, 0), upper slope u+ / (u+ - l-) (1 when l = u = 0), upper bias
// -slope l-, lower slope [u+ + l- >= 0], lower bias 0. A NaN bound gives a NaN upper slope,
// so every row and constant after it is NaN (never certified).
template <typename T>
inline void relu_relaxation(T l, T u, T& lower_slope, T& upper_slope, T& upper_bias) {
  const T neg = negative_part(l), pos = positive_part(u);
  const T width = pos - neg;
  const T degenerate = width == 0 ? T(1) : T(0);
  const T chord = pos / (width + degenerate);
  upper_bias = -chord * neg;
  lower_slope = pos + neg >= 0 ? T(1) : T(0);
  upper_slope = chord + degenerate;
}

// At a ReLU with pre-activation bounds [l, u]: half the slopes (hl, hu), the next constants,
// and the output interval [relu(l), relu(u)] with its centre and radius.
template <typename T>
void relu_relax_row(int64_t n, const T* __restrict__ l, const T* __restrict__ u, const T* __restrict__ cc,
                    const T* __restrict__ rc, T* __restrict__ hl, T* __restrict__ hu, T* __restrict__ occ,
                    T* __restrict__ orc, T* __restrict__ yl, T* __restrict__ yu, T* __restrict__ ym,
                    T* __restrict__ yr) {
  for (int64_t i = 0; i < n; ++i) {
    T s_lo, s_up, b_up;
    relu_relaxation(l[i], u[i], s_lo, s_up, b_up);
    const T h_lo = s_lo * T(0.5), h_up = s_up * T(0.5), half_b = b_up * T(0.5);
    const T half_up = h_up * (cc[i] + rc[i]), half_lo = h_lo * (cc[i] - rc[i]);
    occ[i] = (half_up + half_lo) + half_b;
    orc[i] = (half_up - half_lo) + half_b;
    hl[i] = h_lo;
    hu[i] = h_up;
    const T a = positive_part(l[i]), b = positive_part(u[i]);
    yl[i] = a;
    yu[i] = b;
    ym[i] = (b + a) / 2;
    yr[i] = (b - a) / 2;
  }
}

// One affine node of the clipping layer, y = s x + t, on a block of pixels: the interval
// [l, u] and the equations' scales (lam, ups) and offsets (lo, up); a negative s swaps lower
// and upper. add: t != 0 (the interval then gets + t; the equations always do).
template <typename T>
void clip_affine(int64_t n, T s, T t, bool add, T* __restrict__ l, T* __restrict__ u, T* __restrict__ lam,
                 T* __restrict__ ups, T* __restrict__ lo, T* __restrict__ up, T* __restrict__ out_l,
                 T* __restrict__ out_u) {
  for (int64_t i = 0; i < n; ++i) {
    const bool flip = s < 0;
    const T a = (flip ? u[i] : l[i]) * s, b = (flip ? l[i] : u[i]) * s;
    l[i] = add ? a + t : a;
    u[i] = add ? b + t : b;
    out_l[i] = l[i];
    out_u[i] = u[i];
    const T lam0 = flip ? ups[i] : lam[i], ups0 = flip ? lam[i] : ups[i];
    const T lo0 = flip ? up[i] : lo[i], up0 = flip ? lo[i] : up[i];
    lam[i] = lam0 * s;
    ups[i] = ups0 * s;
    lo[i] = lo0 * s + t;
    up[i] = up0 * s + t;
  }
}

// One ReLU of the clipping layer on a block of pixels (pixel range [pm - pr, pm + pr]): the
// pre-activation bounds (the equations' bounds ∩ the input interval [l, u], into pre_l, pre_u),
// the relaxation applied to the equations, the output interval into [l, u] and out.
template <typename T>
void clip_relu(int64_t n, const T* __restrict__ pm, const T* __restrict__ pr, T* __restrict__ l,
               T* __restrict__ u, T* __restrict__ lam, T* __restrict__ ups, T* __restrict__ lo, T* __restrict__ up,
               T* __restrict__ pre_l, T* __restrict__ pre_u) {
  for (int64_t i = 0; i < n; ++i) {
    const T sym_l = (lo[i] + lam[i] * pm[i]) - std::abs(lam[i]) * pr[i];
    const T sym_u = (up[i] + ups[i] * pm[i]) + std::abs(ups[i]) * pr[i];
    pre_l[i] = larger(l[i], sym_l);
    pre_u[i] = smaller(u[i], sym_u);
  }
}

template <typename T>
void clip_relax(int64_t n, const T* __restrict__ pre_l, const T* __restrict__ pre_u, T* __restrict__ l,
                T* __restrict__ u, T* __restrict__ lam, T* __restrict__ ups, T* __restrict__ lo, T* __restrict__ up,
                T* __restrict__ out_l, T* __restrict__ out_u) {
  for (int64_t i = 0; i < n; ++i) {
    T s_lo, s_up, b_up;
    relu_relaxation(pre_l[i], pre_u[i], s_lo, s_up, b_up);
    lam[i] = s_lo * lam[i];
    lo[i] = T(0) + s_lo * lo[i];
    ups[i] = s_up * ups[i];
    up[i] = b_up + s_up * up[i];
    l[i] = positive_part(pre_l[i]);
    u[i] = positive_part(pre_u[i]);
    out_l[i] = l[i];
    out_u[i] = u[i];
  }
}

// The clipping layer's output: the rows' scales (ups ± lam) / 2 and the constants
// (up ± lo) / 2 + c (ups ± lam) / 2.
template <typename T>
void clip_out(int64_t n, const T* __restrict__ lam, const T* __restrict__ ups, const T* __restrict__ lo,
              const T* __restrict__ up, const T* __restrict__ c, T* __restrict__ o_lam, T* __restrict__ o_ups,
              T* __restrict__ o_lo, T* __restrict__ o_up, T* __restrict__ half_sum, T* __restrict__ half_diff,
              T* __restrict__ centre_const, T* __restrict__ radius_const) {
  for (int64_t i = 0; i < n; ++i) {
    const T hs = (ups[i] + lam[i]) * T(0.5), hd = (ups[i] - lam[i]) * T(0.5);
    o_lam[i] = lam[i];
    o_ups[i] = ups[i];
    o_lo[i] = lo[i];
    o_up[i] = up[i];
    half_sum[i] = hs;
    half_diff[i] = hd;
    centre_const[i] = (up[i] + lo[i]) * T(0.5) + hs * c[i];
    radius_const[i] = (up[i] - lo[i]) * T(0.5) + hd * c[i];
  }
}

// Training's backward of the step at an activation with non-negative slopes (the forward is
// bounds_of_rows and half_sums; robnet_svc/bounds/kernels.py, NATIVE): with gc, gr the
// gradients of the next rows, hl += (gc - gr) Lo_k and hu += (gc + gr) Up_k for one row k.
template <typename T>
void add_slope_grads_row(int64_t n, const T* __restrict__ gc, const T* __restrict__ gr, const T* __restrict__ ck,
                         const T* __restrict__ rk, T* __restrict__ ghl, T* __restrict__ ghu) {
  for (int64_t i = 0; i < n; ++i) {
    ghl[i] += (gc[i] - gr[i]) * (ck[i] - rk[i]);
    ghu[i] += (gc[i] + gr[i]) * (ck[i] + rk[i]);
  }
}

// torch.sign on the CPU: -1, 0 or 1, and 0 for a NaN ((0 < x) - (x < 0)).
template <typename T>
inline T sign_of(T x) {
  return x > 0 ? T(1) : (x < 0 ? T(-1) : T(0));
}

// The rows' gradients for one row k: g_lo = hl (gc - gr) + gsl (m - q sign(Lo_k)),
// g_up = hu (gc + gr) + gsu (m + q sign(Up_k)); centre g_lo + g_up, radius g_up - g_lo.
template <typename T>
void row_grads_row(int64_t n, T m, T q, const T* __restrict__ gc, const T* __restrict__ gr,
                   const T* __restrict__ ck, const T* __restrict__ rk, const T* __restrict__ hl,
                   const T* __restrict__ hu, const T* __restrict__ gsl, const T* __restrict__ gsu,
                   T* __restrict__ oc, T* __restrict__ orad) {
  for (int64_t i = 0; i < n; ++i) {
    const T g_lo = hl[i] * (gc[i] - gr[i]) + gsl[i] * (m - q * sign_of(ck[i] - rk[i]));
    const T g_up = hu[i] * (gc[i] + gr[i]) + gsu[i] * (m + q * sign_of(ck[i] + rk[i]));
    oc[i] = g_lo + g_up;
    orad[i] = g_up - g_lo;
  }
}

}  // namespace

// lower = lo_const + sum_k mid_k Lo_k - rad_k |Lo_k|, upper = up_const + sum_k mid_k Up_k + rad_k |Up_k|:
// the bounds of the two equations over the box, [B, N] each.
std::vector<torch::Tensor> bounds_of_rows(const torch::Tensor& c, const torch::Tensor& r,
                                          const torch::Tensor& lo_const, const torch::Tensor& up_const,
                                          const torch::Tensor& mid, const torch::Tensor& rad) {
  check_rows(c, r);
  const int64_t B = c.size(0), K = c.size(1), N = c.size(2);
  check_node(lo_const, c, N, "lo_const");
  check_node(up_const, c, N, "up_const");
  check_node(mid, c, K, "mid");
  check_node(rad, c, K, "rad");
  torch::Tensor lower = lo_const.clone(), upper = up_const.clone();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "bounds_of_rows", [&] {
    const scalar_t* C = c.data_ptr<scalar_t>();
    const scalar_t* R = r.data_ptr<scalar_t>();
    const scalar_t* M = mid.data_ptr<scalar_t>();
    const scalar_t* Q = rad.data_ptr<scalar_t>();
    scalar_t* L = lower.data_ptr<scalar_t>();
    scalar_t* U = upper.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          add_row_bounds<scalar_t>(N, M[b * K + k], Q[b * K + k], C + at, R + at, L + b * N, U + b * N);
        }
      }
    });
  });
  return {lower, upper};
}

// centre' = hu Up + hl Lo, radius' = hu Up - hl Lo (hl, hu [B, N]: half the lower and upper
// slopes, non-negative): the next rows after an activation, [B, K, N] each.
std::vector<torch::Tensor> half_sums(const torch::Tensor& c, const torch::Tensor& r,
                                     const torch::Tensor& hl, const torch::Tensor& hu) {
  check_rows(c, r);
  const int64_t B = c.size(0), K = c.size(1), N = c.size(2);
  check_node(hl, c, N, "hl");
  check_node(hu, c, N, "hu");
  torch::Tensor centre = torch::empty_like(c), radius = torch::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "half_sums", [&] {
    const scalar_t* C = c.data_ptr<scalar_t>();
    const scalar_t* R = r.data_ptr<scalar_t>();
    const scalar_t* HL = hl.data_ptr<scalar_t>();
    const scalar_t* HU = hu.data_ptr<scalar_t>();
    scalar_t* OC = centre.data_ptr<scalar_t>();
    scalar_t* OR = radius.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          half_sums_row<scalar_t>(N, HL + b * N, HU + b * N, C + at, R + at, OC + at, OR + at);
        }
      }
    });
  });
  return {centre, radius};
}

// The whole step at a ReLU, one sample at a time while its rows are in cache: the bounds of
// Lo and Up over the box (as bounds_of_rows), intersected with the node's interval (iv_a,
// iv_b: its lower and upper bounds, or with iv_mid_rad its centre and radius) and, when given,
// the tighter bounds t_lo, t_up into the pre-activation bounds [l, u]; the ReLU relaxation on
// [l, u]; the next rows (as half_sums) and constants; the ReLU's output interval
// [relu(l), relu(u)] with its centre and radius. c_const, r_const: the centre and radius
// constants [B, N]. Returns (l, u, centre', radius', centre_const', radius_const', relu(l),
// relu(u), centre and radius of those).
std::vector<torch::Tensor> relu_step(const torch::Tensor& c, const torch::Tensor& r,
                                     const torch::Tensor& c_const, const torch::Tensor& r_const,
                                     const torch::Tensor& mid, const torch::Tensor& rad,
                                     const torch::Tensor& iv_a, const torch::Tensor& iv_b, bool iv_mid_rad,
                                     const c10::optional<torch::Tensor>& t_lo, const c10::optional<torch::Tensor>& t_up) {
  check_rows(c, r);
  const int64_t B = c.size(0), K = c.size(1), N = c.size(2);
  check_node(c_const, c, N, "c_const");
  check_node(r_const, c, N, "r_const");
  check_node(mid, c, K, "mid");
  check_node(rad, c, K, "rad");
  check_node(iv_a, c, N, "iv_a");
  check_node(iv_b, c, N, "iv_b");
  const bool tight = t_lo.has_value();
  TORCH_CHECK(tight == t_up.has_value(), "t_lo and t_up come together");
  if (tight) {
    check_node(*t_lo, c, N, "t_lo");
    check_node(*t_up, c, N, "t_up");
  }
  std::vector<torch::Tensor> out{torch::empty_like(c_const), torch::empty_like(c_const), torch::empty_like(c),
                                 torch::empty_like(r)};
  for (int t = 0; t < 6; ++t) out.push_back(torch::empty_like(c_const));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "relu_step", [&] {
    const scalar_t* C = c.data_ptr<scalar_t>();
    const scalar_t* R = r.data_ptr<scalar_t>();
    const scalar_t* CC = c_const.data_ptr<scalar_t>();
    const scalar_t* RC = r_const.data_ptr<scalar_t>();
    const scalar_t* M = mid.data_ptr<scalar_t>();
    const scalar_t* Q = rad.data_ptr<scalar_t>();
    const scalar_t* IA = iv_a.data_ptr<scalar_t>();
    const scalar_t* IB = iv_b.data_ptr<scalar_t>();
    const scalar_t* TL = tight ? t_lo->data_ptr<scalar_t>() : nullptr;
    const scalar_t* TU = tight ? t_up->data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t*> o;
    for (auto& t : out) o.push_back(t.data_ptr<scalar_t>());
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> half_slopes(2 * N);
      scalar_t* hl = half_slopes.data();
      scalar_t* hu = half_slopes.data() + N;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t node = b * N;
        scalar_t* lo = o[0] + node;
        scalar_t* up = o[1] + node;
        start_bounds<scalar_t>(N, CC + node, RC + node, lo, up);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          add_row_bounds<scalar_t>(N, M[b * K + k], Q[b * K + k], C + at, R + at, lo, up);
        }
        intersect_interval<scalar_t>(N, iv_mid_rad, IA + node, IB + node, lo, up);
        if (tight) intersect_bounds<scalar_t>(N, TL + node, TU + node, lo, up);
        relu_relax_row<scalar_t>(N, lo, up, CC + node, RC + node, hl, hu, o[4] + node, o[5] + node, o[6] + node,
                                 o[7] + node, o[8] + node, o[9] + node);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          half_sums_row<scalar_t>(N, hl, hu, C + at, R + at, o[2] + at, o[3] + at);
        }
      }
    });
  });
  return out;
}

// The clipping layer of an SSIP pass (robnet_svc/bounds/propagate.py, _clip_layer_forward) per
// pixel: nodes that are affine (y = scale x + shift, python scalars) or ReLUs, applied to the
// exact image x = W a + c whose pixel range over the box is [pm - pr, pm + pr]. Each node's
// lower and upper equations are lam x + lo and ups x + up; per node the interval bounds (and,
// at a ReLU, the pre-activation bounds: the equations' bounds ∩ the input's interval ∩ the
// tighter bounds t_lo[j], t_up[j] when those are not empty), then the ReLU relaxation as in
// relu_step. c_img: the image's constant c. Returns, all [B, P]: each node's interval (lower,
// upper), each ReLU's pre-activation (lower, upper), then lam, ups, lo, up, and the output
// rows' scales and constants (ups + lam) / 2, (ups - lam) / 2, (up + lo) / 2 + c (ups + lam) / 2,
// (up - lo) / 2 + c (ups - lam) / 2.
std::vector<torch::Tensor> clip_layer(const torch::Tensor& pm, const torch::Tensor& pr, const torch::Tensor& c_img,
                                      const std::vector<bool>& relu, const std::vector<double>& scales,
                                      const std::vector<double>& shifts, const std::vector<torch::Tensor>& t_lo,
                                      const std::vector<torch::Tensor>& t_up) {
  TORCH_CHECK(pm.dim() == 2 && pm.is_contiguous() && pm.device().is_cpu(), "pm must be contiguous [B, P] on the CPU");
  TORCH_CHECK(pm.scalar_type() == torch::kFloat || pm.scalar_type() == torch::kDouble, "pm must be float32 or float64");
  const int64_t B = pm.size(0), P = pm.size(1), total = B * P;
  check_node(pr, pm, P, "pr");
  check_node(c_img, pm, P, "c_img");
  const size_t nodes = relu.size();
  TORCH_CHECK(scales.size() == nodes && shifts.size() == nodes && t_lo.size() == nodes && t_up.size() == nodes,
              "one scale, shift and pair of tighter bounds per node");
  for (size_t j = 0; j < nodes; ++j) {
    TORCH_CHECK(t_lo[j].numel() == t_up[j].numel(), "tighter bounds come in pairs");
    if (t_lo[j].numel() > 0) {
      TORCH_CHECK(relu[j], "tighter bounds belong to a ReLU");
      check_node(t_lo[j], pm, P, "t_lo");
      check_node(t_up[j], pm, P, "t_up");
    }
  }
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < 2 * nodes; ++j) out.push_back(torch::empty_like(pm));
  std::vector<size_t> pre_at(nodes, 0);
  for (size_t j = 0; j < nodes; ++j) {
    if (relu[j]) {
      pre_at[j] = out.size();
      out.push_back(torch::empty_like(pm));
      out.push_back(torch::empty_like(pm));
    }
  }
  const size_t tail = out.size();
  for (int t = 0; t < 8; ++t) out.push_back(torch::empty_like(pm));
  AT_DISPATCH_FLOATING_TYPES(pm.scalar_type(), "clip_layer", [&] {
    std::vector<scalar_t*> o;
    for (auto& t : out) o.push_back(t.data_ptr<scalar_t>());
    std::vector<const scalar_t*> tl(nodes, nullptr), tu(nodes, nullptr);
    for (size_t j = 0; j < nodes; ++j) {
      if (t_lo[j].numel() > 0) {
        tl[j] = t_lo[j].data_ptr<scalar_t>();
        tu[j] = t_up[j].data_ptr<scalar_t>();
      }
    }
    const scalar_t* PM = pm.data_ptr<scalar_t>();
    const scalar_t* PR = pr.data_ptr<scalar_t>();
    const scalar_t* CI = c_img.data_ptr<scalar_t>();
    constexpr int64_t BLOCK = 1024;  // pixels per block: the working arrays stay in L1
    at::parallel_for(0, (total + BLOCK - 1) / BLOCK, grain(BLOCK * int64_t(nodes)), [&](int64_t q0, int64_t q1) {
      std::vector<scalar_t> work(6 * BLOCK);
      scalar_t *l = work.data(), *u = l + BLOCK, *lam = u + BLOCK, *ups = lam + BLOCK, *lo = ups + BLOCK,
               *up = lo + BLOCK;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t s = q * BLOCK, n = std::min(BLOCK, total - s);
        for (int64_t i = 0; i < n; ++i) {
          l[i] = PM[s + i] - PR[s + i];
          u[i] = PM[s + i] + PR[s + i];
          lam[i] = ups[i] = scalar_t(1);
          lo[i] = up[i] = scalar_t(0);
        }
        for (size_t j = 0; j < nodes; ++j) {
          if (!relu[j]) {
            clip_affine<scalar_t>(n, scalar_t(scales[j]), scalar_t(shifts[j]), shifts[j] != 0, l, u, lam, ups, lo, up,
                                  o[2 * j] + s, o[2 * j + 1] + s);
            continue;
          }
          scalar_t* pre_l = o[pre_at[j]] + s;
          scalar_t* pre_u = o[pre_at[j] + 1] + s;
          clip_relu<scalar_t>(n, PM + s, PR + s, l, u, lam, ups, lo, up, pre_l, pre_u);
          if (tl[j]) intersect_bounds<scalar_t>(n, tl[j] + s, tu[j] + s, pre_l, pre_u);
          clip_relax<scalar_t>(n, pre_l, pre_u, l, u, lam, ups, lo, up, o[2 * j] + s, o[2 * j + 1] + s);
        }
        clip_out<scalar_t>(n, lam, ups, lo, up, CI + s, o[tail] + s, o[tail + 1] + s, o[tail + 2] + s,
                           o[tail + 3] + s, o[tail + 4] + s, o[tail + 5] + s, o[tail + 6] + s, o[tail + 7] + s);
      }
    });
  });
  return out;
}

// s1 w and s2 w (w [B, K, N], s1, s2 [B, N]): the clipping layer's output rows, w read once.
std::vector<torch::Tensor> scaled_rows(const torch::Tensor& w, const torch::Tensor& s1, const torch::Tensor& s2) {
  check_rows(w, w);
  const int64_t B = w.size(0), K = w.size(1), N = w.size(2);
  check_node(s1, w, N, "s1");
  check_node(s2, w, N, "s2");
  torch::Tensor o1 = torch::empty_like(w), o2 = torch::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "scaled_rows", [&] {
    const scalar_t* W = w.data_ptr<scalar_t>();
    const scalar_t* S1 = s1.data_ptr<scalar_t>();
    const scalar_t* S2 = s2.data_ptr<scalar_t>();
    scalar_t* O1 = o1.data_ptr<scalar_t>();
    scalar_t* O2 = o2.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          const scalar_t* __restrict__ a = S1 + b * N;
          const scalar_t* __restrict__ c = S2 + b * N;
          const scalar_t* __restrict__ wk = W + at;
          scalar_t* __restrict__ x = O1 + at;
          scalar_t* __restrict__ y = O2 + at;
          for (int64_t i = 0; i < N; ++i) {
            x[i] = a[i] * wk[i];
            y[i] = c[i] * wk[i];
          }
        }
      }
    });
  });
  return {o1, o2};
}

// Training's backward, first kernel: the gradients of the half slopes from those of the next
// rows (gc, gr [B, K, N]): g_hl = sum_k (gc - gr) Lo, g_hu = sum_k (gc + gr) Up, [B, N] each.
std::vector<torch::Tensor> slope_grads(const torch::Tensor& gc, const torch::Tensor& gr, const torch::Tensor& c,
                                       const torch::Tensor& r) {
  check_rows(c, r);
  check_rows(gc, gr);
  TORCH_CHECK(gc.sizes() == c.sizes() && gc.scalar_type() == c.scalar_type(), "gradients must be shaped as the rows");
  const int64_t B = c.size(0), K = c.size(1), N = c.size(2);
  torch::Tensor g_hl = torch::zeros({B, N}, c.options()), g_hu = torch::zeros({B, N}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "slope_grads", [&] {
    const scalar_t* GC = gc.data_ptr<scalar_t>();
    const scalar_t* GR = gr.data_ptr<scalar_t>();
    const scalar_t* C = c.data_ptr<scalar_t>();
    const scalar_t* R = r.data_ptr<scalar_t>();
    scalar_t* HL = g_hl.data_ptr<scalar_t>();
    scalar_t* HU = g_hu.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          add_slope_grads_row<scalar_t>(N, GC + at, GR + at, C + at, R + at, HL + b * N, HU + b * N);
        }
      }
    });
  });
  return {g_hl, g_hu};
}

// Training's backward, second kernel: the gradients of the rows c, r from those of the next
// rows (through the half slopes hl, hu [B, N]) and of the bounds' sums (gsl, gsu [B, N], through
// the box mid, rad [B, K]).
std::vector<torch::Tensor> row_grads(const torch::Tensor& gc, const torch::Tensor& gr, const torch::Tensor& c,
                                     const torch::Tensor& r, const torch::Tensor& hl, const torch::Tensor& hu,
                                     const torch::Tensor& mid, const torch::Tensor& rad, const torch::Tensor& gsl,
                                     const torch::Tensor& gsu) {
  check_rows(c, r);
  check_rows(gc, gr);
  TORCH_CHECK(gc.sizes() == c.sizes() && gc.scalar_type() == c.scalar_type(), "gradients must be shaped as the rows");
  const int64_t B = c.size(0), K = c.size(1), N = c.size(2);
  check_node(hl, c, N, "hl");
  check_node(hu, c, N, "hu");
  check_node(gsl, c, N, "gsl");
  check_node(gsu, c, N, "gsu");
  check_node(mid, c, K, "mid");
  check_node(rad, c, K, "rad");
  torch::Tensor out_c = torch::empty_like(c), out_r = torch::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "row_grads", [&] {
    const scalar_t* GC = gc.data_ptr<scalar_t>();
    const scalar_t* GR = gr.data_ptr<scalar_t>();
    const scalar_t* C = c.data_ptr<scalar_t>();
    const scalar_t* R = r.data_ptr<scalar_t>();
    const scalar_t* HL = hl.data_ptr<scalar_t>();
    const scalar_t* HU = hu.data_ptr<scalar_t>();
    const scalar_t* M = mid.data_ptr<scalar_t>();
    const scalar_t* Q = rad.data_ptr<scalar_t>();
    const scalar_t* SL = gsl.data_ptr<scalar_t>();
    const scalar_t* SU = gsu.data_ptr<scalar_t>();
    scalar_t* OC = out_c.data_ptr<scalar_t>();
    scalar_t* OR = out_r.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(K * N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t at = (b * K + k) * N;
          row_grads_row<scalar_t>(N, M[b * K + k], Q[b * K + k], GC + at, GR + at, C + at, R + at, HL + b * N,
                                  HU + b * N, SL + b * N, SU + b * N, OC + at, OR + at);
        }
      }
    });
  });
  return {out_c, out_r};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bounds_of_rows", &bounds_of_rows, "bounds of the SSIP equations over the box");
  m.def("half_sums", &half_sums, "the SSIP rows after an activation with non-negative slopes");
  m.def("relu_step", &relu_step, "the SSIP step at a ReLU: bounds, relaxation, next rows and constants");
  m.def("clip_layer", &clip_layer, "the clipping layer's equations per pixel");
  m.def("scaled_rows", &scaled_rows, "two scalings of the rows");
  m.def("slope_grads", &slope_grads, "training's backward: gradients of the half slopes");
  m.def("row_grads", &row_grads, "training's backward: gradients of the rows");
}
