// The Monitor's per-layer statistics in one call per step (see stats.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace steadygrad {

// What a parameter is to its layer, and so which sums it feeds.
enum Role : int64_t { kWeightGrad = 0, kBiasGrad = 1, kWeight = 2 };
// How an activation saturates or dies (as steadygrad.measure.stats.activation_kind).
enum Kind : int64_t { kNoKind = 0, kTanh = 1, kSigmoid = 2, kRectifier = 3 };

// One parameter tensor of a logged step: which slot (layer call) it belongs to, what it is to that layer, and,
// for a weight, where to copy it (null: nowhere).
struct Entry {
  at::Tensor tensor;
  int64_t slot, role;
  float* copy;
};

struct SlotSums;

// (slots, 17) float64, one row per layer slot (layer call), in the layout of
// steadygrad.measure.hooks.SUMS_COLUMNS, for the Collector's entries (float32 CPU tensors), each slot's row
// starting from ``taps`` (the sums the Collector accumulated as the step ran):
//   0 n, 1 mean, 2 M2, 3 min, 4 max, 5 sum of squares       activation (micro-batches merged, Chan et al.)
//   6 non-finite count of the activation
//   7 saturated, 8 values counted, 9 units, 10 dead units   the activation function's output
//   11 output-gradient sum of squares (NaN: none received), 12 its non-finite count
//   13 weight-gradient, 14 bias-gradient sum of squares (NaN: none)
//   15 weight n, 16 weight M2                               the layer's first weight
// A weight entry with a copy pointer is copied there in the same pass (for the update-to-weight ratio).
at::Tensor slot_statistics(const std::vector<Entry>& entries, int64_t n_slots, std::vector<SlotSums>* taps);

// Whether ``snapshot`` can hold a copy of ``weight``: both float32 on the CPU, one size, the snapshot contiguous.
bool snapshot_fits(const at::Tensor& snapshot, const at::Tensor& weight);

// (n, 2) float64: [||now - before||^2, ||before||^2] per pair of float32 tensors (NaN for an undefined pair).
at::Tensor update_norms(const std::vector<at::Tensor>& now, const std::vector<at::Tensor>& before);

}  // namespace steadygrad
