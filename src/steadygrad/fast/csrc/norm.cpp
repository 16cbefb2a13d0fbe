// steadygrad's fused normalization kernels (CPU, float32): the math of steadygrad.norm.functional, written
// against the memory hierarchy. Each forward reads x twice and writes y; each backward reads dy and x twice
// and writes dx; the second read of every group comes from cache: a LayerNorm row (4 KB), a GroupNorm group
// (32 KB), a BatchNorm channel (256 KB for (64, 64, 32, 32)).
//
// Statistics, per group of m values with k one of its samples (the shift) and t = x - k:
//   md = sum(t) / m,  var = sum(t^2) / m - md^2,  rstd = 1 / sqrt(var + eps),  x_hat = (t - md) * rstd.
// Shifting by a sample makes |md| of the order of a standard deviation, so the one-pass variance does not
// cancel the way E[x^2] - E[x]^2 does at a large mean (Chan, Golub, LeVeque 1983), and the mean is kept as
// k + md: folding them into one float32 would round a mean of 1e4 to 1e-3, a tenth of a std of 1e-2.
//
// Backward, with g = dy * gamma, A = sum(g), B = sum(g * t), so that sum(g * x_hat) = rstd (B - md A):
//   dx = rstd (g - A / m - x_hat sum(g x_hat) / m)        (the terms through x_hat, the mean, the variance)
//      = rstd g + c t + e,  c = -rstd^2 G,  e = rstd^2 G md - rstd A / m,  G = sum(g x_hat) / m
//   dgamma = sum(dy x_hat),  dbeta = sum(dy)
#include "norm.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_util.h"

namespace steadygrad {
namespace {

constexpr int64_t kFlushRows = 64;  // float accumulators of a row sweep are added into doubles this often

// An absent weight, bias or running statistic travels as an empty tensor: autograd Functions take no
// undefined tensors as inputs.
const float* ptr_or_null(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

at::Tensor float_buffer(int64_t n, const at::Tensor& like) { return at::empty({n}, like.options()); }

float inverse_std(double var, double eps) { return static_cast<float>(1.0 / std::sqrt(var + eps)); }

// The backward's coefficients of t and of the constant, from the group's sums (see the header comment).
struct Coefficients {
  float c, e;
};
Coefficients backward_coefficients(double sum_g, double sum_gt, float md, float rstd, double m) {
  const double r = rstd;
  const double g_xhat = r * (sum_gt - md * sum_g) / m;  // G
  return {static_cast<float>(-r * r * g_xhat), static_cast<float>(r * r * g_xhat * md - r * sum_g / m)};
}

}  // namespace

// --- layer and group norm: rows of d values, row r in group r % groups --------------------------------------

std::vector<at::Tensor> rows_forward(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                                     const RowLayout& layout, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "rows_forward takes a float32 tensor");
  const at::Tensor x = x_in.contiguous();  // any shape: rows of d = cpg * hw values (the caller need not reshape)
  const int64_t d = layout.cpg * layout.hw, rows = d > 0 ? x.numel() / d : 0;
  at::Tensor y = at::empty_like(x), shift = float_buffer(rows, x), dev = float_buffer(rows, x),
             rstd = float_buffer(rows, x);
  const float *xp = x.data_ptr<float>(), *w = ptr_or_null(weight), *b = ptr_or_null(bias);
  float *yp = y.data_ptr<float>(), *kp = shift.data_ptr<float>(), *dp = dev.data_ptr<float>(),
        *rp = rstd.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      const float k = d ? xr[0] : 0.f;
      float s, q;
      shifted_sums(xr, d, k, s, q);
      const double mean_dev = static_cast<double>(s) / d;
      const float md = static_cast<float>(mean_dev), rs = inverse_std(std::max(0.0, q / d - mean_dev * mean_dev), eps);
      kp[r] = k;
      dp[r] = md;
      rp[r] = rs;
      if (!layout.per_element) {  // GroupNorm: a scale and shift per channel
        const int64_t base = (r % layout.groups) * layout.cpg;
        for (int64_t c = 0; c < layout.cpg; ++c) {
          const float scale = rs * (w ? w[base + c] : 1.f);
          affine_shifted(xr + c * layout.hw, yr + c * layout.hw, layout.hw, k, scale,
                         (b ? b[base + c] : 0.f) - md * scale);
        }
      } else if (!w && !b) {
        affine_shifted(xr, yr, d, k, rs, -md * rs);
      } else {  // LayerNorm's elementwise affine: y = x_hat * w + b
        const Vec kv(k), mv(md), rv(rs), one(1.f), zero(0.f);
        int64_t j = 0;
        for (; j + kLanes <= d; j += kLanes) {
          const Vec xh = (Vec::loadu(xr + j) - kv - mv) * rv;
          at::vec::fmadd(xh, w ? Vec::loadu(w + j) : one, b ? Vec::loadu(b + j) : zero).store(yr + j);
        }
        for (; j < d; ++j) yr[j] = ((xr[j] - k) - md) * rs * (w ? w[j] : 1.f) + (b ? b[j] : 0.f);
      }
    }
  });
  return {y, shift, dev, rstd};
}

std::vector<at::Tensor> rows_backward(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& shift,
                                      const at::Tensor& dev, const at::Tensor& rstd, const at::Tensor& weight,
                                      const RowLayout& layout, bool need_affine) {
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const int64_t d = layout.cpg * layout.hw, rows = d > 0 ? x.numel() / d : 0;
  at::Tensor dx = at::empty_like(x);
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *kp = shift.data_ptr<float>(),
              *dp = dev.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *w = ptr_or_null(weight);
  float* dxp = dx.data_ptr<float>();
  const int64_t width = layout.per_element ? d : layout.groups * layout.cpg;  // affine parameters
  const int threads = at::get_num_threads();
  // per-thread partial dgamma and dbeta (a thread's chunks run one after another: no races)
  std::vector<double> partial_w(need_affine ? static_cast<size_t>(threads) * width : 0, 0.0);
  std::vector<double> partial_b(partial_w.size(), 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const size_t t = static_cast<size_t>(at::get_thread_num());
    double* pw = need_affine ? partial_w.data() + t * width : nullptr;
    double* pb = need_affine ? partial_b.data() + t * width : nullptr;
    std::vector<float> lw(layout.per_element && need_affine ? d : 0, 0.f), lb(lw.size(), 0.f);
    std::vector<float> chan_a(layout.per_element ? 0 : layout.cpg), chan_b(chan_a.size());  // GroupNorm's
    int64_t pending = 0;  // rows in lw/lb not yet added into the double partials
    for (int64_t r = begin; r < end; ++r) {
      const float *dyr = dyp + r * d, *xr = xp + r * d;
      float* dxr = dxp + r * d;
      const float k = kp[r], md = dp[r], rs = rp[r];
      if (layout.per_element) {
        float a, bsum;
        if (w)
          gradient_sums<true>(dyr, xr, w, d, k, a, bsum);
        else
          gradient_sums<false>(dyr, xr, nullptr, d, k, a, bsum);
        const Coefficients co = backward_coefficients(a, bsum, md, rs, static_cast<double>(d));
        const Vec kv(k), mv(md), rv(rs), cv(co.c), ev(co.e), one(1.f);
        int64_t j = 0;
        for (; j + kLanes <= d; j += kLanes) {
          const Vec g = Vec::loadu(dyr + j), tv = Vec::loadu(xr + j) - kv;
          at::vec::fmadd(rv * (w ? Vec::loadu(w + j) : one), g, at::vec::fmadd(cv, tv, ev)).store(dxr + j);
          if (need_affine) {
            at::vec::fmadd(g, (tv - mv) * rv, Vec::loadu(lw.data() + j)).store(lw.data() + j);
            (Vec::loadu(lb.data() + j) + g).store(lb.data() + j);
          }
        }
        for (; j < d; ++j) {
          const float tj = xr[j] - k;
          dxr[j] = rs * (w ? w[j] : 1.f) * dyr[j] + co.c * tj + co.e;
          if (need_affine) {
            lw[j] += dyr[j] * (tj - md) * rs;
            lb[j] += dyr[j];
          }
        }
        if (need_affine && (++pending == kFlushRows || r + 1 == end)) {
          for (int64_t i = 0; i < d; ++i) {
            pw[i] += lw[i];
            pb[i] += lb[i];
            lw[i] = lb[i] = 0.f;
          }
          pending = 0;
        }
      } else {
        const int64_t base = (r % layout.groups) * layout.cpg, hw = layout.hw;
        double a = 0.0, bsum = 0.0;
        for (int64_t c = 0; c < layout.cpg; ++c) {  // per channel, then weighted by its gamma
          gradient_sums<false>(dyr + c * hw, xr + c * hw, nullptr, hw, k, chan_a[c], chan_b[c]);
          const float wc = w ? w[base + c] : 1.f;
          a += wc * static_cast<double>(chan_a[c]);
          bsum += wc * static_cast<double>(chan_b[c]);
        }
        const Coefficients co = backward_coefficients(a, bsum, md, rs, static_cast<double>(d));
        for (int64_t c = 0; c < layout.cpg; ++c) {
          combine_gradient(dyr + c * hw, xr + c * hw, dxr + c * hw, hw, k, rs * (w ? w[base + c] : 1.f), co.c,
                           co.e);
          if (need_affine) {  // dgamma_c = sum(dy x_hat) = rstd (sum(dy t) - md sum(dy)), dbeta_c = sum(dy)
            pw[base + c] += rs * (static_cast<double>(chan_b[c]) - md * static_cast<double>(chan_a[c]));
            pb[base + c] += chan_a[c];
          }
        }
      }
    }
  });
  at::Tensor dw, db;
  if (need_affine) {
    dw = at::zeros({width}, x.options().dtype(at::kDouble));
    db = at::zeros({width}, x.options().dtype(at::kDouble));
    double *dwp = dw.data_ptr<double>(), *dbp = db.data_ptr<double>();
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < width; ++j) {
        dwp[j] += partial_w[static_cast<size_t>(t) * width + j];
        dbp[j] += partial_b[static_cast<size_t>(t) * width + j];
      }
    dw = dw.to(at::kFloat);
    db = db.to(at::kFloat);
  }
  return {dx, dw, db};
}

// --- batch norm over (N, C, L): per channel over N and L; channel ch's shift is x[0, ch, 0] ------------------

namespace {

// Per-thread accumulators for the small-L layout (BatchNorm1d on (N, C)), where a row holds every channel:
// vector adds across the row into float buffers, flushed into doubles every kFlushRows rows.
struct RowSweep {
  int64_t width;
  int threads;
  std::vector<double> first, second;  // (threads, width)
  RowSweep(int64_t width_, int threads_)
      : width(width_), threads(threads_), first(static_cast<size_t>(threads_) * width_, 0.0), second(first.size(), 0.0) {}
  double channel_total(const std::vector<double>& part, int64_t ch, int64_t l) const {
    double total = 0.0;
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < l; ++j) total += part[static_cast<size_t>(t) * width + ch * l + j];
    return total;
  }
  // rows [begin, end) of thread t: first += p(row), second += q(row) through f(row, buf1, buf2)
  template <typename F>
  void sweep(int64_t begin, int64_t end, size_t t, F&& accumulate_row) {
    std::vector<float> s(width, 0.f), q(width, 0.f);
    int64_t pending = 0;
    for (int64_t i = begin; i < end; ++i) {
      accumulate_row(i, s.data(), q.data());
      if (++pending == kFlushRows || i + 1 == end) {
        for (int64_t j = 0; j < width; ++j) {
          first[t * width + j] += s[j];
          second[t * width + j] += q[j];
          s[j] = q[j] = 0.f;
        }
        pending = 0;
      }
    }
  }
};

}  // namespace

BatchForward batch_forward(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 2, "batch_forward takes (N, C, *) float32");
  const at::Tensor x = x_in.contiguous();  // viewed as (N, C, L): the caller need not reshape
  const int64_t n = x.size(0), c = x.size(1), l = n * c > 0 ? x.numel() / (n * c) : 0, width = c * l;
  const double count = static_cast<double>(n) * l;
  BatchForward out;
  out.y = at::empty_like(x);
  out.mean = float_buffer(c, x);
  out.var = float_buffer(c, x);
  out.shift = float_buffer(c, x);
  out.dev = float_buffer(c, x);
  out.rstd = float_buffer(c, x);
  const float *xp = x.data_ptr<float>(), *w = ptr_or_null(weight), *b = ptr_or_null(bias);
  float *yp = out.y.data_ptr<float>(), *kp = out.shift.data_ptr<float>(), *dp = out.dev.data_ptr<float>(),
        *vp = out.var.data_ptr<float>(), *rp = out.rstd.data_ptr<float>(), *mp = out.mean.data_ptr<float>();
  for (int64_t ch = 0; ch < c; ++ch) kp[ch] = xp[ch * l];
  auto finish_channel = [&](int64_t ch, double s, double q) {
    const double mean_dev = s / count, v = std::max(0.0, q / count - mean_dev * mean_dev);
    dp[ch] = static_cast<float>(mean_dev);
    mp[ch] = static_cast<float>(kp[ch] + mean_dev);
    vp[ch] = static_cast<float>(v);
    rp[ch] = inverse_std(v, eps);
  };
  if (l >= 16) {  // per channel: its N chunks of L values stay in cache between the two passes
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float k = kp[ch];
        double s = 0.0, q = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          float a, a2;
          shifted_sums(xp + (i * c + ch) * l, l, k, a, a2);
          s += a;
          q += a2;
        }
        finish_channel(ch, s, q);
        const float scale = rp[ch] * (w ? w[ch] : 1.f), beta = (b ? b[ch] : 0.f) - dp[ch] * scale;
        for (int64_t i = 0; i < n; ++i) affine_shifted(xp + (i * c + ch) * l, yp + (i * c + ch) * l, l, k, scale, beta);
      }
    });
    return out;
  }
  // small L: sweep whole rows (all channels) with vector accumulators per (channel, position)
  std::vector<float> kw(width), scale(width), beta(width);
  for (int64_t j = 0; j < width; ++j) kw[j] = kp[j / l];
  RowSweep sums(width, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    sums.sweep(begin, end, static_cast<size_t>(at::get_thread_num()), [&](int64_t i, float* s, float* q) {
      const float* row = xp + i * width;
      int64_t j = 0;
      for (; j + kLanes <= width; j += kLanes) {
        const Vec t = Vec::loadu(row + j) - Vec::loadu(kw.data() + j);
        (Vec::loadu(s + j) + t).store(s + j);
        at::vec::fmadd(t, t, Vec::loadu(q + j)).store(q + j);
      }
      for (; j < width; ++j) {
        const float t = row[j] - kw[j];
        s[j] += t;
        q[j] += t * t;
      }
    });
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    finish_channel(ch, sums.channel_total(sums.first, ch, l), sums.channel_total(sums.second, ch, l));
    const float sc = rp[ch] * (w ? w[ch] : 1.f), be = (b ? b[ch] : 0.f) - dp[ch] * sc;
    for (int64_t j = 0; j < l; ++j) {
      scale[ch * l + j] = sc;
      beta[ch * l + j] = be;
    }
  }
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * width;
      float* o = yp + i * width;
      int64_t j = 0;
      for (; j + kLanes <= width; j += kLanes)
        at::vec::fmadd(Vec::loadu(row + j) - Vec::loadu(kw.data() + j), Vec::loadu(scale.data() + j),
                       Vec::loadu(beta.data() + j))
            .store(o + j);
      for (; j < width; ++j) o[j] = (row[j] - kw[j]) * scale[j] + beta[j];
    }
  });
  return out;
}

std::vector<at::Tensor> batch_backward(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& shift,
                                       const at::Tensor& dev, const at::Tensor& rstd, const at::Tensor& weight) {
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), l = n * c > 0 ? x.numel() / (n * c) : 0, width = c * l;
  const double count = static_cast<double>(n) * l;
  at::Tensor dx = at::empty_like(x), dw = float_buffer(c, x), db = float_buffer(c, x);
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *kp = shift.data_ptr<float>(),
              *dp = dev.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *w = ptr_or_null(weight);
  float *dxp = dx.data_ptr<float>(), *dwp = dw.data_ptr<float>(), *dbp = db.data_ptr<float>();
  // per channel: dbeta = A = sum(dy), dgamma = rstd (B - md A) with B = sum(dy t), and the gradient's
  // coefficients (gamma enters as a factor of g = gamma dy)
  auto finish_channel = [&](int64_t ch, double sum_dy, double sum_dyt) {
    const float wc = w ? w[ch] : 1.f;
    dbp[ch] = static_cast<float>(sum_dy);
    dwp[ch] = static_cast<float>(rp[ch] * (sum_dyt - dp[ch] * sum_dy));
    const Coefficients co = backward_coefficients(wc * sum_dy, wc * sum_dyt, dp[ch], rp[ch], count);
    return co;
  };
  if (l >= 16) {
    at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float k = kp[ch];
        double a = 0.0, bsum = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          float pa, pb;
          gradient_sums<false>(dyp + (i * c + ch) * l, xp + (i * c + ch) * l, nullptr, l, k, pa, pb);
          a += pa;
          bsum += pb;
        }
        const Coefficients co = finish_channel(ch, a, bsum);
        const float scale = rp[ch] * (w ? w[ch] : 1.f);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t offset = (i * c + ch) * l;
          combine_gradient(dyp + offset, xp + offset, dxp + offset, l, k, scale, co.c, co.e);
        }
      }
    });
    return {dx, dw, db};
  }
  std::vector<float> kw(width), scale(width), cw(width), ew(width);
  for (int64_t j = 0; j < width; ++j) kw[j] = kp[j / l];
  RowSweep sums(width, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    sums.sweep(begin, end, static_cast<size_t>(at::get_thread_num()), [&](int64_t i, float* s, float* q) {
      const float *g = dyp + i * width, *row = xp + i * width;
      int64_t j = 0;
      for (; j + kLanes <= width; j += kLanes) {
        const Vec gv = Vec::loadu(g + j);
        (Vec::loadu(s + j) + gv).store(s + j);
        at::vec::fmadd(gv, Vec::loadu(row + j) - Vec::loadu(kw.data() + j), Vec::loadu(q + j)).store(q + j);
      }
      for (; j < width; ++j) {
        s[j] += g[j];
        q[j] += g[j] * (row[j] - kw[j]);
      }
    });
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    const Coefficients co =
        finish_channel(ch, sums.channel_total(sums.first, ch, l), sums.channel_total(sums.second, ch, l));
    for (int64_t j = 0; j < l; ++j) {
      scale[ch * l + j] = rp[ch] * (w ? w[ch] : 1.f);
      cw[ch * l + j] = co.c;
      ew[ch * l + j] = co.e;
    }
  }
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *g = dyp + i * width, *row = xp + i * width;
      float* o = dxp + i * width;
      int64_t j = 0;
      for (; j + kLanes <= width; j += kLanes) {
        const Vec t = Vec::loadu(row + j) - Vec::loadu(kw.data() + j);
        at::vec::fmadd(Vec::loadu(scale.data() + j), Vec::loadu(g + j),
                       at::vec::fmadd(Vec::loadu(cw.data() + j), t, Vec::loadu(ew.data() + j)))
            .store(o + j);
      }
      for (; j < width; ++j) o[j] = scale[j] * g[j] + cw[j] * (row[j] - kw[j]) + ew[j];
    }
  });
  return {dx, dw, db};
}

// --- autograd: thin Functions over the kernels, so a training step never leaves C++ -----------------------

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_once_differentiable() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "steadygrad's normalization backward is hand-derived and differentiable once: a second derivative "
              "(create_graph=True, gradient penalties, Hessian-vector products) is not supported. Convert the "
              "model to torch's norms for that: steadygrad.norm.convert_norms(model, to='torch').");
}

// running <- (1 - momentum) running + momentum batch, as torch.nn's BatchNorm
void update_running(const at::Tensor& running, const at::Tensor& batch, double momentum, double factor) {
  if (!running.defined() || running.numel() == 0) return;
  float* r = running.data_ptr<float>();
  const float* v = batch.data_ptr<float>();
  for (int64_t i = 0; i < running.numel(); ++i)
    r[i] = static_cast<float>((1.0 - momentum) * r[i] + momentum * factor * v[i]);
  running.unsafeGetTensorImpl()->bump_version();
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                            double momentum, double eps) {
    BatchForward out = batch_forward(x, weight, bias, eps);
    const double count = static_cast<double>(x.numel()) / x.size(1);
    update_running(running_mean, out.mean, momentum, 1.0);
    update_running(running_var, out.var, momentum, count / (count - 1.0));  // unbiased, as torch
    ctx->save_for_backward({x, weight, out.shift, out.dev, out.rstd});
    return out.y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_once_differentiable();
    const auto saved = ctx->get_saved_variables();
    auto result = batch_backward(grads[0], saved[0], saved[2], saved[3], saved[4], saved[1]);
    return {result[0], ctx->needs_input_grad(1) ? result[1] : at::Tensor(),
            ctx->needs_input_grad(2) ? result[2] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct RowsNormFunction : public torch::autograd::Function<RowsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t groups, int64_t cpg, int64_t hw, bool per_element,
                            double eps) {
    const RowLayout layout{groups, cpg, hw, per_element};
    auto out = rows_forward(x, weight, bias, layout, eps);
    ctx->save_for_backward({x, weight, out[1], out[2], out[3]});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["cpg"] = cpg;
    ctx->saved_data["hw"] = hw;
    ctx->saved_data["per_element"] = per_element;
    return out[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_once_differentiable();
    const auto saved = ctx->get_saved_variables();
    const RowLayout layout{ctx->saved_data["groups"].toInt(), ctx->saved_data["cpg"].toInt(),
                           ctx->saved_data["hw"].toInt(), ctx->saved_data["per_element"].toBool()};
    const bool need_affine = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto result = rows_backward(grads[0], saved[0], saved[2], saved[3], saved[4], saved[1], layout, need_affine);
    return {result[0],     ctx->needs_input_grad(1) ? result[1] : at::Tensor(),
            ctx->needs_input_grad(2) ? result[2] : at::Tensor(),
            at::Tensor(),  at::Tensor(),
            at::Tensor(),  at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::empty({0}, at::kFloat);
}

}  // namespace

at::Tensor batch_norm_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  return BatchNormFunction::apply(x, defined_or_empty(weight), defined_or_empty(bias), defined_or_empty(running_mean),
                                  defined_or_empty(running_var), momentum, eps);
}

at::Tensor rows_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, int64_t groups, int64_t cpg, int64_t hw, bool per_element,
                     double eps) {
  return RowsNormFunction::apply(x, defined_or_empty(weight), defined_or_empty(bias), groups, cpg, hw, per_element,
                                 eps);
}

}  // namespace steadygrad
