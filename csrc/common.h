// Argument checks and layout helpers shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace sidfast {

// True when t is contiguous, channels_last or channels_last_3d with the batch dimension outermost, so
// that sample b occupies the storage range [b*N, (b+1)*N). sidfast/ops/_layout.py mirrors this rule
// for the fake kernels: keep the two in step.
inline bool batch_major_dense(const at::Tensor& t) {
  if (t.dim() == 0) return false;
  const bool dense = t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                     (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  const int64_t B = t.size(0);
  return dense && (B <= 1 || t.stride(0) == t.numel() / B);
}

// The three inputs in one layout the kernels can walk sample by sample: kept as they are when they
// share strides and are batch-major dense (channels_last included), made contiguous otherwise.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> common_dense_layout(const at::Tensor& a, const at::Tensor& b,
                                                                          const at::Tensor& c) {
  if (batch_major_dense(a) && a.strides() == b.strides() && a.strides() == c.strides()) return {a, b, c};
  return {a.contiguous(), b.contiguous(), c.contiguous()};
}

inline void check_sid_loss_args(const at::Tensor& y_real, const at::Tensor& y_fake, const at::Tensor& x_g,
                                int64_t reduction) {
  TORCH_CHECK_VALUE(y_real.dim() >= 1, "sid_loss: y_real must have a batch dimension");
  TORCH_CHECK_VALUE(y_real.sizes() == y_fake.sizes() && y_real.sizes() == x_g.sizes(),
                    "sid_loss: y_real, y_fake and x_g must have the same shape, got ", y_real.sizes(), ", ",
                    y_fake.sizes(), " and ", x_g.sizes());
  TORCH_CHECK_TYPE(y_real.scalar_type() == y_fake.scalar_type() && y_real.scalar_type() == x_g.scalar_type(),
                   "sid_loss: y_real, y_fake and x_g must have the same dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(y_real.scalar_type()), "sid_loss: inputs must be floating point");
  TORCH_CHECK_VALUE(y_real.device() == y_fake.device() && y_real.device() == x_g.device(),
                    "sid_loss: y_real, y_fake and x_g must be on the same device");
  TORCH_CHECK_VALUE(y_real.size(0) > 0 && y_real.numel() > 0, "sid_loss: empty input");
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "sid_loss: reduction must be 0 (none), 1 (sum) or 2 (batchmean)");
}

}  // namespace sidfast
