// Operator schemas of the gradsparse extension, registered once.
// Kernels: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(gradsparse, CPU, m)).
// Reference semantics of every op: gradsparse/_reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import gradsparse._C` loads this library, which registers the operators below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradsparse, m) {
  // Positions (int64, ascending) of every |x| >= threshold.
  m.def("threshold_select(Tensor x, float threshold) -> Tensor");
  // Positions (int64, ascending) of the exact top-k |x|, ties to the lower index, found through a
  // sampled threshold estimate. NaN input is refused.
  m.def("topk_select(Tensor x, int k, float sample_ratio, int seed) -> Tensor");
  // One rank's payload: header | int32 indices | pad | values | dense | pad (gradsparse/payload.py).
  m.def("pack(Tensor indices, Tensor values, Tensor dense, int numel, ScalarType value_dtype, int flags) -> Tensor");
  // DGC momentum correction and accumulation in one pass, in place on fp32 u and v:
  // u = m*u + g; v = v + u   (nesterov: u = m*(u + g); v = v + u + g).
  m.def("dgc_compensate(Tensor(a!) u, Tensor(b!) v, Tensor g, float momentum, bool nesterov) -> ()");
  // Validate every payload, then (zero out if overwrite and) scatter-add alpha * values in rank order.
  // Returns the OR of the payloads' flags as a 0-dim int64 tensor.
  m.def("unpack_add(Tensor[] payloads, Tensor(a!) out, ScalarType value_dtype, Tensor? dense_index, "
        "float alpha, bool overwrite) -> Tensor");
}
