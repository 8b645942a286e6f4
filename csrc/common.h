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

// Outputs of sid_loss for inputs already in common_dense_layout: gradients in the input layout and
// dtype, the loss in float32 (float64 for double); per_sample holds each sample's summed loss.
struct SidLossBuffers {
  at::Tensor grad_real, grad_fake, grad_x, per_sample, loss_elem;
  int64_t B, N;
};

inline SidLossBuffers allocate_sid_loss(const at::Tensor& like, int64_t reduction) {
  const auto loss_dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SidLossBuffers out;
  out.B = like.size(0);
  out.N = like.numel() / out.B;
  out.grad_real = at::empty_like(like);
  out.grad_fake = at::empty_like(like);
  out.grad_x = at::empty_like(like);
  out.per_sample = at::empty({out.B}, like.options().dtype(loss_dtype));
  if (reduction == 0) out.loss_elem = at::empty_like(like, like.options().dtype(loss_dtype));
  return out;
}

// The op's outputs: the per-element loss ("none"), or the per-sample sums reduced in double on the
// tensors' device (sum; batchmean divides by the full batch), with no host synchronisation.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_sid_loss(const SidLossBuffers& b,
                                                                                 int64_t reduction) {
  at::Tensor loss = b.loss_elem;
  if (reduction != 0) {
    loss = b.per_sample.sum(at::kDouble);
    if (reduction == 2) loss = loss / static_cast<double>(b.B);
    loss = loss.to(b.per_sample.scalar_type());
  }
  return {loss, b.grad_real, b.grad_fake, b.grad_x};
}

}  // namespace sidfast
