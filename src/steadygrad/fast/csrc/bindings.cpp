// Python bindings of steadygrad's compiled kernels (built on first use by steadygrad.fast).
#include <torch/extension.h>

#include "collector.h"
#include "norm.h"
#include "stats.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm_train", &steadygrad::batch_norm_train, "Training-mode BatchNorm on (N, C, L), differentiable");
  m.def("rows_norm", &steadygrad::rows_norm, "LayerNorm/GroupNorm on (rows, d), differentiable");
  py::class_<steadygrad::Collector, std::shared_ptr<steadygrad::Collector>>(
      m, "Collector", "The Monitor's taps for one logged step, gathered in C++ (see csrc/collector.h)")
      .def(py::init<std::vector<std::vector<at::Tensor>>, std::vector<std::vector<at::Tensor>>,
                    std::vector<c10::optional<at::Tensor>>, std::vector<c10::optional<at::Tensor>>>())
      .def("output", &steadygrad::Collector::output)
      .def("units", &steadygrad::Collector::units)
      .def("statistics", &steadygrad::Collector::statistics, py::arg("slot_layers"), py::arg("snapshot") = true)
      .def("update_norms", &steadygrad::Collector::update_norms)
      .def("clear", &steadygrad::Collector::clear)
      .def_static("columns", &steadygrad::Collector::columns);
}
