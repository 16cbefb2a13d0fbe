// Vector primitives shared by steadygrad's kernels: ATen's Vectorized<float> (AVX-512, AVX2 or the
// portable fallback, chosen by the CPU_CAPABILITY the extension is built for, as torch's own kernels are).
//
// Every reduction keeps four independent vector accumulators: with one, each add waits for the previous
// (4 cycles of latency) and a sum runs at a third of the speed memory delivers the data.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace steadygrad {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline float lane_sum(const Vec& v) {
  alignas(64) float buffer[kLanes];
  v.store(buffer);
  float total = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) total += buffer[i];
  return total;
}

// sum(x - k) and sum((x - k)^2) over n values.
inline void shifted_sums(const float* x, int64_t n, float k, float& sum, float& squares) {
  const Vec kv(k);
  Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f), s2(0.f), s3(0.f), q2(0.f), q3(0.f);
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    const Vec t0 = Vec::loadu(x + j) - kv, t1 = Vec::loadu(x + j + kLanes) - kv;
    const Vec t2 = Vec::loadu(x + j + 2 * kLanes) - kv, t3 = Vec::loadu(x + j + 3 * kLanes) - kv;
    s0 = s0 + t0;
    s1 = s1 + t1;
    s2 = s2 + t2;
    s3 = s3 + t3;
    q0 = at::vec::fmadd(t0, t0, q0);
    q1 = at::vec::fmadd(t1, t1, q1);
    q2 = at::vec::fmadd(t2, t2, q2);
    q3 = at::vec::fmadd(t3, t3, q3);
  }
  for (; j + kLanes <= n; j += kLanes) {
    const Vec t = Vec::loadu(x + j) - kv;
    s0 = s0 + t;
    q0 = at::vec::fmadd(t, t, q0);
  }
  float s = lane_sum((s0 + s1) + (s2 + s3)), q = lane_sum((q0 + q1) + (q2 + q3));
  for (; j < n; ++j) {
    const float t = x[j] - k;
    s += t;
    q += t * t;
  }
  sum = s;
  squares = q;
}

// sum(g) and sum(g * (x - k)) over n values, with g = dy * w (w per element) or g = dy (w null).
template <bool kElementWeight>
inline void gradient_sums(const float* dy, const float* x, const float* w, int64_t n, float k, float& sum_g,
                          float& sum_gt) {
  const Vec kv(k);
  Vec a0(0.f), a1(0.f), b0(0.f), b1(0.f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    Vec g0 = Vec::loadu(dy + j), g1 = Vec::loadu(dy + j + kLanes);
    if constexpr (kElementWeight) {
      g0 = g0 * Vec::loadu(w + j);
      g1 = g1 * Vec::loadu(w + j + kLanes);
    }
    a0 = a0 + g0;
    a1 = a1 + g1;
    b0 = at::vec::fmadd(g0, Vec::loadu(x + j) - kv, b0);
    b1 = at::vec::fmadd(g1, Vec::loadu(x + j + kLanes) - kv, b1);
  }
  float a = lane_sum(a0 + a1), b = lane_sum(b0 + b1);
  for (; j < n; ++j) {
    const float g = kElementWeight ? dy[j] * w[j] : dy[j];
    a += g;
    b += g * (x[j] - k);
  }
  sum_g = a;
  sum_gt = b;
}

// y = (x - k) * scale + shift: the normalization with the mean and the affine map folded in.
inline void affine_shifted(const float* x, float* y, int64_t n, float k, float scale, float shift) {
  const Vec kv(k), sv(scale), bv(shift);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) at::vec::fmadd(Vec::loadu(x + j) - kv, sv, bv).store(y + j);
  for (; j < n; ++j) y[j] = (x[j] - k) * scale + shift;
}

// dx = a * dy + c * (x - k) + e: the normalization's backward with its reductions folded into a, c, e.
inline void combine_gradient(const float* dy, const float* x, float* dx, int64_t n, float k, float a, float c,
                             float e) {
  const Vec kv(k), av(a), cv(c), ev(e);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    at::vec::fmadd(av, Vec::loadu(dy + j), at::vec::fmadd(cv, Vec::loadu(x + j) - kv, ev)).store(dx + j);
  for (; j < n; ++j) dx[j] = a * dy[j] + c * (x[j] - k) + e;
}

}  // namespace steadygrad
