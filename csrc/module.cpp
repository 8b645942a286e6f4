// Python module sidfast._C: build information. Importing it registers the ops in sidfast.cpp.
#include <torch/extension.h>

#ifndef SIDFAST_SOURCE_HASH
#define SIDFAST_SOURCE_HASH "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sidfast native operators (registered as torch.ops.sidfast.*)";
  m.def("source_hash", []() { return std::string(SIDFAST_SOURCE_HASH); },
        "Hash of the csrc/ sources this extension was built from");
  m.def("torch_version", []() { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against");
#ifdef SIDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
