// The sums behind a layer's statistics, shared by slot_statistics (stats.cpp) and the Collector
// (collector.cpp): what one tensor adds, and a layer call's row of the table.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

namespace steadygrad {

// A row of sums: len(SUMS_COLUMNS) of steadygrad/_layout.py, the one declaration of its columns. Python checks this
// width through Collector.columns() before it uses the taps (tests/measure/test_taps.py).
constexpr int64_t kColumns = 17;
constexpr int64_t kChunk = 4096;  // float partial sums cover this many values before joining a double
// A chunk's float sum of squares below this is taken again in double (steadygrad.measure.stats.UNDERFLOW)
constexpr float kUnderflow = 1e-30f;

// Count, mean, M2 (merged by Chan, Golub and LeVeque's update), min, max and sum of squares.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  float lo = std::numeric_limits<float>::infinity(), hi = -std::numeric_limits<float>::infinity();
  double squares = 0.0;

  void merge(const Moments& o) {
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

// What an activation's pass adds beyond its moments: saturated values (tanh, sigmoid) or, for a rectifier,
// each unit's largest value over the batch (dead: <= 0 for every sample of every micro-batch).
struct UnitSums {
  double saturated = 0.0, counted = 0.0;
  std::vector<float> maxima;

  void merge(const UnitSums& o);
};

// Everything one layer call (a slot) accumulates over a step: one row of the table.
struct SlotSums {
  Moments activation;
  double activation_nonfinite = 0.0;
  UnitSums units;
  double grad = NAN, grad_nonfinite = 0.0;  // NaN: no output gradient received
  double weight_grad = NAN, bias_grad = NAN;
  Moments weight;

  void write_row(double* row) const;  // kColumns values, in the layout of SUMS_COLUMNS
};

// The moments of an (N, *) float32 output and by ``kind`` its unit sums (NaN and Inf propagate).
Moments output_moments(const at::Tensor& y, int64_t kind, UnitSums& units);
// The same over the finite values only, counting the others in ``nonfinite`` (the rare, scalar path).
Moments finite_output_moments(const at::Tensor& y, int64_t kind, UnitSums& units, double& nonfinite);
// Sum of squares (NaN and Inf propagate), and over the finite values only, counting the others.
double sum_squares(const float* x, int64_t n);
double finite_sum_squares(const float* x, int64_t n, double& nonfinite);
// A weight's count, mean and M2, copied into ``copy`` (when not null) in the same pass.
Moments weight_moments(const float* x, int64_t n, float* copy);

}  // namespace steadygrad
