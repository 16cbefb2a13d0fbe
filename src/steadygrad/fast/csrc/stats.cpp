// The Monitor's sums, for the Collector (collector.cpp): an output's moments and unit statistics, a
// gradient's sum of squares, and at the step's end every logged layer's parameters in one call, parallel over
// layers. Per tensor one pass, with several vector accumulators per sum (see vec_util.h).
//
// Activation moments are shifted sums (t = y - k, k the first value), merged across tensors by Chan, Golub
// and LeVeque's update: M2 = sum(t^2) - sum(t)^2 / n is then accurate however large the mean. NaN and Inf
// propagate into the fast sums; the Collector then sums that tensor again over its finite values
// (finite_output_moments, finite_sum_squares), counting the others.
#include "stats.h"

#include "moments.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "vec_util.h"

namespace steadygrad {
namespace {

constexpr float kTanhSaturation = 0.99f;     // as steadygrad.measure.stats.TANH_SATURATION
constexpr float kSigmoidSaturation = 0.01f;  // as steadygrad.measure.stats.SIGMOID_SATURATION

inline Vec saturated_lanes(const Vec& v, int64_t kind) {
  const Vec one(1.f), zero(0.f);
  if (kind == kTanh) return Vec::blendv(zero, one, v.abs() > Vec(kTanhSaturation));
  return Vec::blendv(zero, one, (v < Vec(kSigmoidSaturation)) | (v > Vec(1.f - kSigmoidSaturation)));
}

inline bool saturated_value(float v, int64_t kind) {
  return kind == kTanh ? std::fabs(v) > kTanhSaturation : (v < kSigmoidSaturation) || (v > 1.f - kSigmoidSaturation);
}

// One pass over an (rows, units) output: shifted sums (t = y - k), min, max and, by kind, the unit sums.
// Sum of squares of y itself: sum(y^2) = sum(t^2) + 2 k sum(t) + n k^2.
template <int64_t kKind>
Moments moments(const float* x, int64_t rows, int64_t units, UnitSums* unit_sums) {
  Moments m;
  const int64_t n = rows * units;
  if (n == 0) return m;
  const float k = x[0];
  const Vec kv(k);
  double s = 0.0, q = 0.0, sat = 0.0;
  Vec lo(x[0]), hi(x[0]), s0(0.f), s1(0.f), q0(0.f), q1(0.f), c0(0.f);
  double rest_s = 0.0, rest_q = 0.0;  // the values past the last full vector of a row, summed in double
  float rest_c = 0.f, rest_lo = x[0], rest_hi = x[0];
  bool rest_nan = false;
  float* maxima = kKind == kRectifier ? unit_sums->maxima.data() : nullptr;
  int64_t pending = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * units;
    for (int64_t start = 0; start < units; start += kChunk) {  // kChunk is a multiple of 2 kLanes
      const int64_t stop = std::min(units, start + kChunk);
      int64_t j = start;
      for (; j + 2 * kLanes <= stop; j += 2 * kLanes) {
        const Vec v0 = Vec::loadu(row + j), v1 = Vec::loadu(row + j + kLanes);
        const Vec t0 = v0 - kv, t1 = v1 - kv;
        s0 = s0 + t0;
        s1 = s1 + t1;
        q0 = at::vec::fmadd(t0, t0, q0);
        q1 = at::vec::fmadd(t1, t1, q1);
        lo = at::vec::minimum(lo, at::vec::minimum(v0, v1));
        hi = at::vec::maximum(hi, at::vec::maximum(v0, v1));
        if constexpr (kKind == kRectifier) {
          at::vec::maximum(Vec::loadu(maxima + j), v0).store(maxima + j);
          at::vec::maximum(Vec::loadu(maxima + j + kLanes), v1).store(maxima + j + kLanes);
        } else if constexpr (kKind == kTanh || kKind == kSigmoid) {
          c0 = c0 + saturated_lanes(v0, kKind) + saturated_lanes(v1, kKind);
        }
      }
      for (; j < stop; ++j) {
        const float v = row[j], t = v - k;
        rest_s += t;
        rest_q += static_cast<double>(t) * t;
        rest_nan = rest_nan || std::isnan(v);
        rest_lo = std::min(rest_lo, v);
        rest_hi = std::max(rest_hi, v);
        if constexpr (kKind == kRectifier) maxima[j] = std::isnan(v) ? v : std::max(maxima[j], v);
        if constexpr (kKind == kTanh || kKind == kSigmoid) rest_c += saturated_value(v, kKind);
      }
      pending += stop - start;
      if (pending >= kChunk) {  // float partial sums join the doubles
        s += lane_sum(s0 + s1);
        q += lane_sum(q0 + q1);
        sat += lane_sum(c0);
        s0 = s1 = q0 = q1 = c0 = Vec(0.f);
        pending = 0;
      }
    }
  }
  s += lane_sum(s0 + s1) + rest_s;
  q += lane_sum(q0 + q1) + rest_q;
  sat += lane_sum(c0) + rest_c;
  alignas(64) float lows[kLanes], highs[kLanes];
  lo.store(lows);
  hi.store(highs);
  m.lo = rest_nan ? NAN : rest_lo;
  m.hi = rest_nan ? NAN : rest_hi;
  for (int64_t i = 0; i < kLanes; ++i) {
    m.lo = std::isnan(m.lo) || std::isnan(lows[i]) ? NAN : std::min(m.lo, lows[i]);
    m.hi = std::isnan(m.hi) || std::isnan(highs[i]) ? NAN : std::max(m.hi, highs[i]);
  }
  m.n = static_cast<double>(n);
  m.mean = k + s / n;
  m.m2 = std::max(0.0, q - s * s / n);
  m.squares = q + 2.0 * k * s + n * static_cast<double>(k) * k;
  if (kKind == kTanh || kKind == kSigmoid) {
    unit_sums->saturated += sat;
    unit_sums->counted += static_cast<double>(n);
  }
  return m;
}

// An (N, *) output as rows of units: rows matter only to a rectifier's units, anything else is one flat row.
void unit_layout(const at::Tensor& y, int64_t kind, int64_t& rows, int64_t& units) {
  const int64_t n = y.numel();
  rows = kind == kRectifier && y.dim() >= 1 && n > 0 ? y.size(0) : 1;
  units = rows ? n / rows : 0;
}

}  // namespace

void UnitSums::merge(const UnitSums& o) {
  saturated += o.saturated;
  counted += o.counted;
  if (maxima.empty()) {
    maxima = o.maxima;
  } else if (maxima.size() == o.maxima.size()) {
    for (size_t i = 0; i < maxima.size(); ++i) maxima[i] = std::max(maxima[i], o.maxima[i]);
  }
}

void SlotSums::write_row(double* row) const {
  int64_t dead = 0;
  for (float m : units.maxima) dead += !(m > 0.f);
  const double values[kColumns] = {activation.n,
                                   activation.mean,
                                   activation.m2,
                                   activation.lo,
                                   activation.hi,
                                   activation.squares,
                                   activation_nonfinite,
                                   units.saturated,
                                   units.counted,
                                   static_cast<double>(units.maxima.size()),
                                   static_cast<double>(dead),
                                   grad,
                                   grad_nonfinite,
                                   weight_grad,
                                   bias_grad,
                                   weight.n,
                                   weight.m2};
  std::copy(values, values + kColumns, row);
}

Moments output_moments(const at::Tensor& y, int64_t kind, UnitSums& unit_sums) {
  const float* p = y.data_ptr<float>();
  int64_t rows, units;
  unit_layout(y, kind, rows, units);
  switch (kind) {
    case kRectifier:
      if (unit_sums.maxima.empty()) unit_sums.maxima.assign(units, -std::numeric_limits<float>::infinity());
      if (static_cast<int64_t>(unit_sums.maxima.size()) == units) return moments<kRectifier>(p, rows, units, &unit_sums);
      return moments<kNoKind>(p, rows, units, &unit_sums);  // a micro-batch of another shape: no unit sums
    case kTanh:
      return moments<kTanh>(p, rows, units, &unit_sums);
    case kSigmoid:
      return moments<kSigmoid>(p, rows, units, &unit_sums);
    default:
      return moments<kNoKind>(p, rows, units, &unit_sums);
  }
}

// A weight's count, mean and M2 (shifted sums, float chunks joining doubles), copied into ``copy`` (when not
// null) chunk by chunk while the chunk is still in L1: one pass over the weight, not two.
Moments weight_moments(const float* x, int64_t n, float* copy) {
  Moments m;
  if (n == 0) return m;
  const float k = x[0];
  double s = 0.0, q = 0.0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t size = std::min(n - start, kChunk);
    float chunk_sum, chunk_squares;
    shifted_sums(x + start, size, k, chunk_sum, chunk_squares);
    if (copy != nullptr) std::memcpy(copy + start, x + start, size * sizeof(float));
    s += chunk_sum;
    q += chunk_squares;
  }
  m.n = static_cast<double>(n);
  m.mean = k + s / m.n;
  m.m2 = std::max(0.0, q - s * s / m.n);
  return m;
}

Moments finite_output_moments(const at::Tensor& y, int64_t kind, UnitSums& unit_sums, double& nonfinite) {
  const float* p = y.data_ptr<float>();
  int64_t rows, units;
  unit_layout(y, kind, rows, units);
  if (kind == kRectifier && unit_sums.maxima.empty()) unit_sums.maxima.assign(units, -INFINITY);
  const bool unit_maxima = kind == kRectifier && static_cast<int64_t>(unit_sums.maxima.size()) == units;
  // two passes in double over the finite values (Welford would do too: this path is for the rare broken step)
  double n = 0.0, total = 0.0;
  for (int64_t i = 0; i < rows * units; ++i) {
    if (std::isfinite(p[i])) {
      n += 1.0;
      total += p[i];
    }
  }
  Moments m;
  m.n = n;
  m.mean = n > 0 ? total / n : 0.0;
  nonfinite += static_cast<double>(rows * units) - n;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t u = 0; u < units; ++u) {
      const float v = p[r * units + u];
      // NaN is neither > 0 nor saturated, as in the eager statistics (steadygrad.measure.stats.unit_moments)
      if (unit_maxima && v > unit_sums.maxima[u]) unit_sums.maxima[u] = v;
      if (kind == kTanh || kind == kSigmoid) unit_sums.saturated += saturated_value(v, kind);
      if (!std::isfinite(v)) continue;
      const double d = v - m.mean;
      m.m2 += d * d;
      m.squares += static_cast<double>(v) * v;
      m.lo = std::min(m.lo, v);
      m.hi = std::max(m.hi, v);
    }
  }
  if (kind == kTanh || kind == kSigmoid) unit_sums.counted += static_cast<double>(rows * units);
  return m;
}

double finite_sum_squares(const float* x, int64_t n, double& nonfinite) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(x[i])) {
      total += static_cast<double>(x[i]) * x[i];
    } else {
      nonfinite += 1.0;
    }
  }
  return total;
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
    if (part < kUnderflow) {  // float squares of values under ~1e-19 underflow: a vanishing gradient is not 0
      double exact = 0.0;
      for (j = start; j < end; ++j) exact += static_cast<double>(x[j]) * x[j];
      total += exact;
    } else {
      total += part;
    }
  }
  return total;
}

static void add_parameter(SlotSums& sums, const Entry& e, const at::Tensor& dense) {
  const float* p = dense.data_ptr<float>();
  const int64_t n = dense.numel();
  switch (e.role) {
    case kWeightGrad:
      sums.weight_grad = (std::isnan(sums.weight_grad) ? 0.0 : sums.weight_grad) + sum_squares(p, n);
      break;
    case kBiasGrad:
      sums.bias_grad = (std::isnan(sums.bias_grad) ? 0.0 : sums.bias_grad) + sum_squares(p, n);
      break;
    case kWeight:
      sums.weight = weight_moments(p, n, e.copy);
      break;
    default:
      TORCH_CHECK(false, "slot_statistics: unknown role ", e.role);
  }
}

at::Tensor slot_statistics(const std::vector<Entry>& entries, int64_t n_slots, std::vector<SlotSums>* taps) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  std::vector<std::vector<size_t>> work(n_slots);
  std::vector<at::Tensor> dense(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    TORCH_CHECK(e.slot >= 0 && e.slot < n_slots, "slot_statistics: slot index out of range");
    TORCH_CHECK(e.tensor.scalar_type() == at::kFloat && e.tensor.device().is_cpu(),
                "slot_statistics takes float32 CPU tensors (the Collector converts the others)");
    dense[i] = e.tensor.contiguous();
    work[e.slot].push_back(i);
  }
  at::Tensor table = at::empty({n_slots, kColumns}, options);
  double* out = table.data_ptr<double>();
  at::parallel_for(0, n_slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      SlotSums sums = taps != nullptr && slot < static_cast<int64_t>(taps->size()) ? (*taps)[slot] : SlotSums();
      for (size_t i : work[slot]) add_parameter(sums, entries[i], dense[i]);
      sums.write_row(out + slot * kColumns);
    }
  });
  return table;
}

bool snapshot_fits(const at::Tensor& snapshot, const at::Tensor& weight) {
  return snapshot.scalar_type() == at::kFloat && snapshot.device().is_cpu() && snapshot.is_contiguous() &&
         snapshot.numel() == weight.numel() && weight.scalar_type() == at::kFloat && weight.device().is_cpu();
}

at::Tensor update_norms(const std::vector<at::Tensor>& now, const std::vector<at::Tensor>& before) {
  TORCH_CHECK(now.size() == before.size(), "update_norms: as many tensors now as before");
  const int64_t n = static_cast<int64_t>(now.size());
  at::Tensor table = at::empty({n, 2}, at::TensorOptions().dtype(at::kDouble));
  double* out = table.data_ptr<double>();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!now[i].defined() || !before[i].defined()) {  // no snapshot was taken: no ratio
        out[2 * i] = out[2 * i + 1] = nan;
        continue;
      }
      const at::Tensor a = now[i].contiguous(), b = before[i].contiguous();
      TORCH_CHECK(a.numel() == b.numel() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
                  "update_norms takes pairs of float32 tensors of one size");
      const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
      // both sums in one pass: the weight and its copy are read once
      double change = 0.0, size = 0.0;
      for (int64_t start = 0; start < a.numel(); start += kChunk) {
        const int64_t stop = std::min(a.numel(), start + kChunk);
        Vec c0(0.f), c1(0.f), s0(0.f), s1(0.f);
        int64_t j = start;
        for (; j + 2 * kLanes <= stop; j += 2 * kLanes) {
          const Vec b0 = Vec::loadu(pb + j), b1 = Vec::loadu(pb + j + kLanes);
          const Vec d0 = Vec::loadu(pa + j) - b0, d1 = Vec::loadu(pa + j + kLanes) - b1;
          c0 = at::vec::fmadd(d0, d0, c0);
          c1 = at::vec::fmadd(d1, d1, c1);
          s0 = at::vec::fmadd(b0, b0, s0);
          s1 = at::vec::fmadd(b1, b1, s1);
        }
        float part = lane_sum(c0 + c1), part_size = lane_sum(s0 + s1);
        for (; j < stop; ++j) {
          part += (pa[j] - pb[j]) * (pa[j] - pb[j]);
          part_size += pb[j] * pb[j];
        }
        change += part;
        size += part_size;
      }
      out[2 * i] = change;
      out[2 * i + 1] = size;
    }
  });
  return table;
}

}  // namespace steadygrad
