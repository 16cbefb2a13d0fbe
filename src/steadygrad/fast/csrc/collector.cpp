// The Monitor's taps in C++. The forward hook (Python, one per layer call) hands each output here; a C++
// tensor hook sums the output and its gradient when the gradient arrives: the next layer's backward has just
// read the one and written the other, so both are in cache, and the backward pass runs no Python for the
// Monitor. Nothing is kept past that point: holding every output and gradient until the step's end would stop
// the backward pass from reusing their memory, which costs more than the sums. The parameters are summed at
// the step's end, when their gradients are final.
//
// NaN and Inf: a tensor whose fast sums are not finite is summed again over its finite values, counting the
// others (as the eager statistics do), so the records never need a second look.
#include "collector.h"

#include <cmath>

namespace steadygrad {
namespace {

// Statistics are taken in float32 on the CPU: a tensor in another dtype or on another device is converted.
at::Tensor as_float_cpu(const at::Tensor& t) { return t.detach().to(at::kCPU, at::kFloat).contiguous(); }

bool finite(const Moments& m) {
  return std::isfinite(m.mean) && std::isfinite(m.m2) && std::isfinite(m.lo) && std::isfinite(m.hi) &&
         std::isfinite(m.squares);
}

// Whether the float sums hold: finite, and not the underflowed squares of tiny values that are not all zero (float
// squares of values under ~1e-19 are 0). Otherwise the double, finite-only path takes the output again.
bool sums_hold(const Moments& m) { return finite(m) && !(m.squares < kUnderflow && (m.lo != 0.f || m.hi != 0.f)); }

}  // namespace

Collector::Collector(std::vector<std::vector<at::Tensor>> weights, std::vector<std::vector<at::Tensor>> biases,
                     std::vector<c10::optional<at::Tensor>> first_weights,
                     std::vector<c10::optional<at::Tensor>> snapshots)
    : weights_(std::move(weights)),
      biases_(std::move(biases)),
      first_weights_(std::move(first_weights)),
      snapshots_(std::move(snapshots)) {
  const size_t layers = weights_.size();
  TORCH_CHECK(biases_.size() == layers && first_weights_.size() == layers && snapshots_.size() == layers,
              "Collector: weights, biases, first weights and snapshots are per layer and must have one length");
  copied_.assign(layers, false);
}

SlotSums& Collector::slot(int64_t index) {
  TORCH_CHECK(index >= 0, "Collector: negative slot index");
  if (static_cast<size_t>(index) >= sums_.size()) sums_.resize(index + 1);
  return sums_[index];
}

void Collector::add_output(const at::Tensor& y, int64_t slot_index, int64_t kind) {
  const at::Tensor x = as_float_cpu(y);
  UnitSums units;
  Moments m = output_moments(x, kind, units);
  double nonfinite = 0.0;
  if (!sums_hold(m)) {
    units = UnitSums();
    m = finite_output_moments(x, kind, units, nonfinite);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  SlotSums& sums = slot(slot_index);
  sums.activation.merge(m);
  sums.activation_nonfinite += nonfinite;
  sums.units.merge(units);
}

void Collector::output(const at::Tensor& y, int64_t slot_index, int64_t kind) {
  if (!y.requires_grad()) {
    add_output(y, slot_index, kind);
    return;
  }
  int64_t tap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tap = taps_++;
    pending_.emplace(tap, Pending{y.detach(), slot_index, kind});
  }
  // a weak reference: a monitor closed before this backward pass must be neither kept alive nor written to
  std::weak_ptr<Collector> self = weak_from_this();
  y.register_hook([self, slot_index, tap](const at::TensorBase& grad) {
    if (auto collector = self.lock()) collector->add_gradient(at::Tensor(grad), slot_index, tap);
  });
}

void Collector::units(const at::Tensor& y, int64_t slot_index, int64_t kind) {
  const at::Tensor x = as_float_cpu(y);
  std::lock_guard<std::mutex> lock(mutex_);
  SlotSums& sums = slot(slot_index);
  UnitSums units;
  Moments m = output_moments(x, kind, units);
  if (!finite(m)) {
    units = UnitSums();
    double ignored = 0.0;
    finite_output_moments(x, kind, units, ignored);
  }
  sums.units.merge(units);
}

void Collector::add_gradient(const at::Tensor& grad, int64_t slot_index, int64_t tap) {
  c10::optional<Pending> output;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = pending_.find(tap);
    if (found != pending_.end()) {  // the first gradient of this output (a second backward finds it gone)
      output = std::move(found->second);
      pending_.erase(found);
    }
  }
  if (output) add_output(output->y, output->slot, output->kind);
  const at::Tensor g = as_float_cpu(grad);
  const float* p = g.data_ptr<float>();
  double squares = sum_squares(p, g.numel()), nonfinite = 0.0;
  if (!std::isfinite(squares)) squares = finite_sum_squares(p, g.numel(), nonfinite);
  std::lock_guard<std::mutex> lock(mutex_);
  SlotSums& sums = slot(slot_index);
  sums.grad = (std::isnan(sums.grad) ? 0.0 : sums.grad) + squares;
  sums.grad_nonfinite += nonfinite;
}

at::Tensor Collector::statistics(const std::vector<int64_t>& slot_layers, bool snapshot) {
  std::unordered_map<int64_t, Pending> waiting;  // outputs whose gradient never came (no backward through them)
  {
    std::lock_guard<std::mutex> lock(mutex_);
    waiting.swap(pending_);
  }
  for (const auto& item : waiting) add_output(item.second.y, item.second.slot, item.second.kind);
  std::vector<Entry> entries;
  const int64_t n_slots = static_cast<int64_t>(slot_layers.size());
  std::fill(copied_.begin(), copied_.end(), false);
  for (int64_t slot_index = 0; slot_index < n_slots; ++slot_index) {
    const int64_t layer = slot_layers[slot_index];
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(weights_.size()), "Collector: layer index out of range");
    for (const auto* params : {&weights_[layer], &biases_[layer]}) {
      const int64_t role = params == &weights_[layer] ? kWeightGrad : kBiasGrad;
      for (const at::Tensor& p : *params) {
        if (p.grad().defined()) entries.push_back({as_float_cpu(p.grad()), slot_index, role, nullptr});
      }
    }
    if (first_weights_[layer].has_value()) {
      const at::Tensor& weight = *first_weights_[layer];
      float* copy = nullptr;
      // a layer called several times has one weight: copied once, its statistics in every slot
      if (snapshot && !copied_[layer] && snapshots_[layer].has_value() && snapshot_fits(*snapshots_[layer], weight)) {
        copy = snapshots_[layer]->data_ptr<float>();
        copied_[layer] = true;
      }
      entries.push_back({as_float_cpu(weight), slot_index, kWeight, copy});
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return slot_statistics(entries, n_slots, &sums_);
}

at::Tensor Collector::update_norms() const {
  std::vector<at::Tensor> now(copied_.size()), before(copied_.size());
  for (size_t layer = 0; layer < copied_.size(); ++layer) {
    if (copied_[layer]) {
      now[layer] = first_weights_[layer]->detach();
      before[layer] = *snapshots_[layer];
    }
  }
  return steadygrad::update_norms(now, before);
}

void Collector::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  sums_.clear();
  pending_.clear();
  std::fill(copied_.begin(), copied_.end(), false);
}

}  // namespace steadygrad
