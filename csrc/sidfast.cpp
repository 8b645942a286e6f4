// Operator schemas of sidfast: declared once here, implemented per dispatch key in cpu/ and cuda/.
// The Python side (sidfast/ops/) registers fake (meta) kernels and autograd for each op.
#include <torch/extension.h>

#ifndef SIDFAST_SOURCE_HASH
#define SIDFAST_SOURCE_HASH "unknown"
#endif

TORCH_LIBRARY(sidfast, m) {
  // SiD generator loss and its three gradients in one pass (SPEC section 3).
  // reduction: 0 = none (per-element loss; gradients unscaled), 1 = sum, 2 = batchmean (sum / B).
  // normalize: divide by the detached per-sample mean |x_g - y_real| clipped at 1e-5 (denoised space);
  // false gives the noise-space loss. Samples with a NaN in any input contribute zero.
  m.def("sid_loss(Tensor y_real, Tensor y_fake, Tensor x_g, float alpha, bool normalize, int reduction)"
        " -> (Tensor loss, Tensor grad_real, Tensor grad_fake, Tensor grad_x)");
}

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
