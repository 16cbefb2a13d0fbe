// The Monitor's taps for a logged step, in C++: each layer output and output gradient is summed when it
// arrives, while it is in cache, and then let go (see collector.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "moments.h"
#include "stats.h"

namespace steadygrad {

class Collector : public std::enable_shared_from_this<Collector> {
 public:
  // Per watched layer (by index): the parameters whose gradients are read at the step's end, the first weight
  // (its statistics and update ratio) and a buffer for its copy before the update (none: no ratio).
  Collector(std::vector<std::vector<at::Tensor>> weights, std::vector<std::vector<at::Tensor>> biases,
            std::vector<c10::optional<at::Tensor>> first_weights, std::vector<c10::optional<at::Tensor>> snapshots);

  // A layer call's output y for ``slot`` (``kind``: the activation it is the output of, or kNoKind). If y
  // requires grad, a C++ hook sums y and dL/dy when the gradient arrives (both in cache then, and y is let go
  // when autograd lets it go); otherwise y is summed now.
  void output(const at::Tensor& y, int64_t slot, int64_t kind);
  // An activation function's output that is not the layer's own (its unit statistics only).
  void units(const at::Tensor& y, int64_t slot, int64_t kind);

  // Every slot's row of sums (slot_statistics' table, stats.h); slot_layers[i] is slot i's layer index. Adds each
  // slot's parameter gradients and first weight in one parallel pass, copying each first weight once when
  // ``snapshot`` (for update_norms after the optimizer's step; without it no weight is copied, no ratio taken).
  at::Tensor statistics(const std::vector<int64_t>& slot_layers, bool snapshot = true);
  // (layers, 2): [||W - W_before||^2, ||W_before||^2] for the weights statistics() copied, NaN elsewhere.
  at::Tensor update_norms() const;
  // Forget this step's sums (the parameters and snapshot buffers stay).
  void clear();
  // The width of a row of statistics() (kColumns): Python checks it against steadygrad/_layout.py's layout.
  static int64_t columns() { return kColumns; }

 private:
  struct Pending {  // an output waiting for its gradient
    at::Tensor y;
    int64_t slot, kind;
  };

  void add_output(const at::Tensor& y, int64_t slot, int64_t kind);
  void add_gradient(const at::Tensor& grad, int64_t slot, int64_t tap);
  SlotSums& slot(int64_t index);  // call with mutex_ held

  mutable std::mutex mutex_;  // gradient hooks may run on autograd's worker threads
  std::vector<SlotSums> sums_;
  std::unordered_map<int64_t, Pending> pending_;  // by tap number
  int64_t taps_ = 0;
  std::vector<std::vector<at::Tensor>> weights_, biases_;
  std::vector<c10::optional<at::Tensor>> first_weights_, snapshots_;
  std::vector<bool> copied_;  // layers whose snapshot holds this step's weight
};

}  // namespace steadygrad
