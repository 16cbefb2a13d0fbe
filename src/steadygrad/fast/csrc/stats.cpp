// The Monitor's statistics: every logged layer's activation, gradient and weight sums in one compiled call
// per step, parallel over layers. Per tensor one pass, four vector accumulators per sum (see vec_util.h).
//
// Activation moments are shifted sums (t = y - k, k the first value), merged across tensors by Chan, Golub
// and LeVeque's update: M2 = sum(t^2) - sum(t)^2 / n is then accurate however large the mean. NaN and Inf
// are not excluded here: they propagate into the sums, and the Monitor recomputes that layer with masking.
#include "stats.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "vec_util.h"

namespace steadygrad {
namespace {

constexpr int64_t kColumns = 16;
constexpr int64_t kChunk = 4096;  // float partial sums cover this many values before joining a double
constexpr float kTanhSaturation = 0.99f;     // as steadygrad.measure.stats.TANH_SATURATION
constexpr float kSigmoidSaturation = 0.01f;  // as steadygrad.measure.stats.SIGMOID_SATURATION

struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  float lo = std::numeric_limits<float>::infinity(), hi = -std::numeric_limits<float>::infinity();
  double squares = 0.0;

  void merge(const Moments& o) {  // Chan, Golub, LeVeque (1983)
    const double total = n + o.n;
    if (total == 0.0) return;
    const double delta = o.mean - mean;
    mean += delta * o.n / total;
    m2 += o.m2 + delta * delta * n * o.n / total;
    n = total;
    lo = std::isnan(lo) || std::isnan(o.lo) ? NAN : std::min(lo, o.lo);
    hi = std::isnan(hi) || std::isnan(o.hi) ? NAN : std::max(hi, o.hi);
    squares += o.squares;
  }
};

Moments moments(const float* x, int64_t n) {
  Moments m;
  if (n == 0) return m;
  const float k = x[0];
  double s = 0.0, q = 0.0, sq = 0.0;
  Vec lo(x[0]), hi(x[0]);
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    float a, a2;
    shifted_sums(x + start, len, k, a, a2);
    s += a;
    q += a2;
    int64_t j = start;
    Vec s0(0.f), s1(0.f);
    for (; j + 2 * kLanes <= start + len; j += 2 * kLanes) {
      const Vec v0 = Vec::loadu(x + j), v1 = Vec::loadu(x + j + kLanes);
      lo = at::vec::minimum(lo, at::vec::minimum(v0, v1));
      hi = at::vec::maximum(hi, at::vec::maximum(v0, v1));
      s0 = at::vec::fmadd(v0, v0, s0);
      s1 = at::vec::fmadd(v1, v1, s1);
    }
    float part = lane_sum(s0 + s1);
    for (; j < start + len; ++j) {
      lo = at::vec::minimum(lo, Vec(x[j]));
      hi = at::vec::maximum(hi, Vec(x[j]));
      part += x[j] * x[j];
    }
    sq += part;
  }
  alignas(64) float lows[kLanes], highs[kLanes];
  lo.store(lows);
  hi.store(highs);
  m.lo = lows[0];
  m.hi = highs[0];
  for (int64_t i = 1; i < kLanes; ++i) {
    m.lo = std::isnan(m.lo) || std::isnan(lows[i]) ? NAN : std::min(m.lo, lows[i]);
    m.hi = std::isnan(m.hi) || std::isnan(highs[i]) ? NAN : std::max(m.hi, highs[i]);
  }
  m.n = static_cast<double>(n);
  m.mean = k + s / n;
  m.m2 = std::max(0.0, q - s * s / n);
  m.squares = sq;
  return m;
}

double sum_squares(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    int64_t j = start;
    for (; j + 4 * kLanes <= end; j += 4 * kLanes) {
      const Vec v0 = Vec::loadu(x + j), v1 = Vec::loadu(x + j + kLanes), v2 = Vec::loadu(x + j + 2 * kLanes),
                v3 = Vec::loadu(x + j + 3 * kLanes);
      a0 = at::vec::fmadd(v0, v0, a0);
      a1 = at::vec::fmadd(v1, v1, a1);
      a2 = at::vec::fmadd(v2, v2, a2);
      a3 = at::vec::fmadd(v3, v3, a3);
    }
    float part = lane_sum((a0 + a1) + (a2 + a3));
    for (; j < end; ++j) part += x[j] * x[j];
    total += part;
  }
  return total;
}

// Saturated values of a tanh (|y| > 0.99) or sigmoid (y outside [0.01, 0.99]) output.
int64_t saturated(const float* y, int64_t n, int64_t kind) {
  int64_t count = 0;
  if (kind == kTanh) {
#pragma omp simd reduction(+ : count)
    for (int64_t j = 0; j < n; ++j) count += std::fabs(y[j]) > kTanhSaturation;
  } else if (kind == kSigmoid) {
#pragma omp simd reduction(+ : count)
    for (int64_t j = 0; j < n; ++j) count += (y[j] < kSigmoidSaturation) | (y[j] > 1.f - kSigmoidSaturation);
  }
  return count;
}

// Per unit (a position of the per-sample output), the largest value over the batch: a rectifier unit is
// dead if that is <= 0 for every sample of every micro-batch.
void unit_maxima(const float* y, int64_t rows, int64_t units, float* maxima) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = y + r * units;
    int64_t j = 0;
    for (; j + kLanes <= units; j += kLanes)
      at::vec::maximum(Vec::loadu(maxima + j), Vec::loadu(row + j)).store(maxima + j);
    for (; j < units; ++j) maxima[j] = std::max(maxima[j], row[j]);
  }
}

}  // namespace

at::Tensor layer_statistics(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& slots,
                            const std::vector<int64_t>& roles, const std::vector<int64_t>& kinds, int64_t n_slots,
                            const std::vector<c10::optional<at::Tensor>>& snapshots) {
  const size_t count = tensors.size();
  TORCH_CHECK(slots.size() == count && roles.size() == count && kinds.size() == count && snapshots.size() == count,
              "layer_statistics: tensors, slots, roles, kinds and snapshots must have the same length");
  std::vector<std::vector<size_t>> work(n_slots);
  std::vector<at::Tensor> dense(count);
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < n_slots, "layer_statistics: slot index out of range");
    TORCH_CHECK(tensors[i].scalar_type() == at::kFloat && tensors[i].device().is_cpu(),
                "layer_statistics takes float32 CPU tensors");
    dense[i] = tensors[i].contiguous();
    work[slots[i]].push_back(i);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor table = at::empty({n_slots, kColumns}, at::TensorOptions().dtype(at::kDouble));
  double* out = table.data_ptr<double>();
  at::parallel_for(0, n_slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      Moments act, weight;
      double sat = 0.0, counted = 0.0, grad = nan, weight_grad = nan, bias_grad = nan;
      std::vector<float> maxima;
      for (size_t i : work[slot]) {
        const float* p = dense[i].data_ptr<float>();
        const int64_t n = dense[i].numel();
        switch (roles[i]) {
          case kActivation:
            act.merge(moments(p, n));
            break;
          case kUnits:
            if (kinds[i] == kRectifier && dense[i].dim() >= 1 && n > 0) {
              const int64_t units = n / dense[i].size(0);
              if (maxima.empty()) maxima.assign(units, -std::numeric_limits<float>::infinity());
              if (static_cast<int64_t>(maxima.size()) == units) unit_maxima(p, dense[i].size(0), units, maxima.data());
            } else if (kinds[i] == kTanh || kinds[i] == kSigmoid) {
              sat += static_cast<double>(saturated(p, n, kinds[i]));
              counted += static_cast<double>(n);
            }
            break;
          case kOutputGrad:
            grad = (std::isnan(grad) ? 0.0 : grad) + sum_squares(p, n);
            break;
          case kWeightGrad:
            weight_grad = (std::isnan(weight_grad) ? 0.0 : weight_grad) + sum_squares(p, n);
            break;
          case kBiasGrad:
            bias_grad = (std::isnan(bias_grad) ? 0.0 : bias_grad) + sum_squares(p, n);
            break;
          case kWeight:
            weight = moments(p, n);
            if (snapshots[i].has_value()) {
              float* copy = snapshots[i]->data_ptr<float>();
              std::copy(p, p + n, copy);
            }
            break;
          default:
            TORCH_CHECK(false, "layer_statistics: unknown role ", roles[i]);
        }
      }
      int64_t dead = 0;
      for (float m : maxima) dead += !(m > 0.f);
      double* row = out + slot * kColumns;
      const double values[kColumns] = {act.n,     act.mean,        act.m2,     act.lo,      act.hi,
                                       act.squares, sat,           counted,    static_cast<double>(maxima.size()),
                                       static_cast<double>(dead), grad, weight_grad, bias_grad, weight.n,
                                       weight.mean, weight.m2};
      std::copy(values, values + kColumns, row);
    }
  });
  return table;
}

at::Tensor update_norms(const std::vector<at::Tensor>& now, const std::vector<at::Tensor>& before) {
  TORCH_CHECK(now.size() == before.size(), "update_norms: as many tensors now as before");
  const int64_t n = static_cast<int64_t>(now.size());
  at::Tensor table = at::empty({n, 2}, at::TensorOptions().dtype(at::kDouble));
  double* out = table.data_ptr<double>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const at::Tensor a = now[i].contiguous(), b = before[i].contiguous();
      TORCH_CHECK(a.numel() == b.numel() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
                  "update_norms takes pairs of float32 tensors of one size");
      const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
      double change = 0.0;
      for (int64_t start = 0; start < a.numel(); start += kChunk) {
        const int64_t stop = std::min(a.numel(), start + kChunk);
        Vec c0(0.f), c1(0.f);
        int64_t j = start;
        for (; j + 2 * kLanes <= stop; j += 2 * kLanes) {
          const Vec d0 = Vec::loadu(pa + j) - Vec::loadu(pb + j), d1 = Vec::loadu(pa + j + kLanes) - Vec::loadu(pb + j + kLanes);
          c0 = at::vec::fmadd(d0, d0, c0);
          c1 = at::vec::fmadd(d1, d1, c1);
        }
        float part = lane_sum(c0 + c1);
        for (; j < stop; ++j) part += (pa[j] - pb[j]) * (pa[j] - pb[j]);
        change += part;
      }
      out[2 * i] = change;
      out[2 * i + 1] = sum_squares(pb, b.numel());
    }
  });
  return table;
}

}  // namespace steadygrad
