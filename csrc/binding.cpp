// Python binding of backend "cuda"; prefix_kernels/ops/cuda_prefix_attention.py builds it on first use.

#include <optional>
#include <vector>

#include <torch/extension.h>

// Defined in prefix_decode_launcher.cpp.
std::vector<at::Tensor> prefix_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                              const std::optional<at::Tensor>& prefix_index,
                                              const std::optional<at::Tensor>& prefix_lengths,
                                              const std::optional<at::Tensor>& key_mask, bool causal,
                                              double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &prefix_decode_forward, "Prefix attention forward for decode shapes (Sq <= 16): [o, lse].",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"), py::arg("prefix_index"),
        py::arg("prefix_lengths"), py::arg("key_mask"), py::arg("causal"), py::arg("scale"));
}
