// Operator schemas of sidfast: declared once here, implemented per dispatch key in cpu/ and cuda/.
// The Python side (sidfast/ops/) registers fake (meta) kernels and autograd for each op.
// This file and cpu/ need only libtorch (CMakeLists.txt builds them for C++ tests); module.cpp is the
// Python entry point.
#include <torch/library.h>

TORCH_LIBRARY(sidfast, m) {
  // SiD generator loss and its three gradients in one pass
  // (docs/math.md, "SiD generator loss").
  // reduction: 0 = none (per-element loss; gradients unscaled), 1 = sum, 2 = batchmean (sum / B).
  // normalize: divide by the detached per-sample mean |x_g - y_real| clipped at 1e-5 (denoised space);
  // false gives the noise-space loss. Samples with a NaN in any input contribute zero.
  m.def("sid_loss(Tensor y_real, Tensor y_fake, Tensor x_g, float alpha, bool normalize, int reduction)"
        " -> (Tensor loss, Tensor grad_real, Tensor grad_fake, Tensor grad_x)");
}
