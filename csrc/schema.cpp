// The operator schemas of the mos_cuda library, shared by the CUDA build and the CPU
// emulation. They match the Triton custom ops mos::* one for one, so the Python side swaps the
// namespace and reuses the same fake tensors, autograd and FLOP formulas
// (mos_kernels/cuda_registration.py); except session_pool_route(_backward): the Triton op also returns
// the gate and its backward the prototypes' gradient, cuda_registration.py adds those here in PyTorch.
#include <torch/library.h>

TORCH_LIBRARY(mos_cuda, m) {
  // Fake tensors, autograd and FLOP formulas are registered from Python, in this module.
  m.set_python_module("mos_kernels.cuda_registration");
  m.def("session_pool_route(Tensor values, Tensor session_offsets, Tensor prototypes, float inv_temperature, "
        "SymInt top_k) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("session_pool_route_backward(Tensor g_pooled, Tensor g_scores, Tensor g_probs, Tensor values, "
        "Tensor pooled, Tensor probs, Tensor prototypes, Tensor session_offsets, float inv_temperature) "
        "-> (Tensor, Tensor)");
  m.def("theme_dispatch(Tensor themes, Tensor gate, Tensor session_offsets, Tensor session_example, "
        "Tensor example_session_offsets, SymInt num_tokens, SymInt num_themes, SymInt max_theme_tokens) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("theme_gather(Tensor values, Tensor gather_index, Tensor? row_gate, Tensor inverse_index) -> Tensor");
  m.def("theme_scatter(Tensor rows, Tensor gather_index, Tensor? row_gate, Tensor inverse_index) -> Tensor");
  m.def("row_dot(Tensor a, Tensor b, Tensor b_index, ScalarType out_dtype) -> Tensor");
}

#ifdef MOS_PYTHON_MODULE
// Built by setup.py as the module mos_kernels._C: importing it registers the operators.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mos CUDA operators (torch.ops.mos_cuda)", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
