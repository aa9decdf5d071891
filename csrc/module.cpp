// The Python module gaea_ext._C. Importing it runs the static registrations in the other
// translation units; its only Python-level function reports how it was built.
#include <torch/extension.h>

#ifndef GAEA_TORCH_VERSION
#define GAEA_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
  d["torch"] = GAEA_TORCH_VERSION;
#ifdef GAEA_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = GAEA_CUDA_VERSION;
  d["archs"] = GAEA_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["archs"] = py::none();
#endif
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How this gaea_ext._C was compiled");
}
