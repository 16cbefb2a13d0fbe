// steadygrad's fused normalization kernels: declarations (see norm.cpp for the math).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace steadygrad {

// Rows of d values; row r belongs to group r % groups. LayerNorm: one group, per-element affine.
// GroupNorm: cpg channels of hw values per row, per-channel affine.
struct RowLayout {
  int64_t groups, cpg, hw;
  bool per_element;
};

struct BatchForward {
  at::Tensor y, mean, var, shift, dev, rstd;  // per channel: mean = shift + dev, var biased
};

std::vector<at::Tensor> rows_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const RowLayout& layout, double eps);
std::vector<at::Tensor> rows_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& shift,
                                      const at::Tensor& dev, const at::Tensor& rstd, const at::Tensor& weight,
                                      const RowLayout& layout, bool need_affine);
BatchForward batch_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
std::vector<at::Tensor> batch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& shift,
                                       const at::Tensor& dev, const at::Tensor& rstd, const at::Tensor& weight);

// Differentiable entry points (torch::autograd::Function): training-mode BatchNorm on (N, C, L), updating
// the running statistics in place; LayerNorm/GroupNorm on (rows, d).
at::Tensor batch_norm_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double momentum, double eps);
at::Tensor rows_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, int64_t groups, int64_t cpg, int64_t hw, bool per_element,
                     double eps);

}  // namespace steadygrad
