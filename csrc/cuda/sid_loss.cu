// CUDA implementation of sidfast::sid_loss (the native route for GPUs without Triton; sidfast's
// default GPU route is the Triton kernel in sidfast/ops/sid_loss.py). One thread block per sample:
// pass 1 reduces the NaN flag and sum |x_g - y_real| (fp32, fp64 for double), pass 2 writes the loss
// and the three gradients; the per-sample sums are reduced by ATen on the same stream (no host sync).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../common.h"

namespace sidfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void sid_loss_kernel(const scalar_t* __restrict__ pr, const scalar_t* __restrict__ pf,
                                const scalar_t* __restrict__ px, scalar_t* __restrict__ gr,
                                scalar_t* __restrict__ gf, scalar_t* __restrict__ gx, acc_t* __restrict__ loss_elem,
                                acc_t* __restrict__ per_sample, int64_t N, acc_t alpha, acc_t grad_scale,
                                bool normalize) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ acc_t s_inv_w;
  const int64_t off = static_cast<int64_t>(blockIdx.x) * N;

  int has_nan = 0;
  acc_t abs_sum = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    const acc_t r = pr[off + i], f = pf[off + i], x = px[off + i];
    has_nan |= isnan(r) | isnan(f) | isnan(x);
    abs_sum += x > r ? x - r : r - x;
  }
  const bool keep = !__syncthreads_or(has_nan);  // the published code drops samples holding a NaN
  const acc_t total = BlockReduce(tmp).Sum(abs_sum);
  if (threadIdx.x == 0) {
    // w = max(mean |x_g - y_real|, 1e-5), treated as a constant
    // (docs/math.md, "SiD generator loss")
    const acc_t mean = total / static_cast<acc_t>(N);
    s_inv_w = normalize ? acc_t(1) / (mean > acc_t(1e-5) ? mean : acc_t(1e-5)) : acc_t(1);
  }
  __syncthreads();
  const acc_t inv_w = s_inv_w;
  const acc_t g = grad_scale * inv_w;

  acc_t loss_sum = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    acc_t l = 0, d_r = 0, d_f = 0, d_x = 0;
    if (keep) {
      const acc_t r = pr[off + i], f = pf[off + i], x = px[off + i];
      const acc_t d = r - f, e = r - x;
      l = d * (e - alpha * d) * inv_w;
      d_r = (e + (acc_t(1) - acc_t(2) * alpha) * d) * g;
      d_f = (acc_t(2) * alpha * d - e) * g;
      d_x = -d * g;
    }
    loss_sum += l;
    if (loss_elem != nullptr) loss_elem[off + i] = l;
    gr[off + i] = static_cast<scalar_t>(d_r);
    gf[off + i] = static_cast<scalar_t>(d_f);
    gx[off + i] = static_cast<scalar_t>(d_x);
  }
  __syncthreads();  // tmp is reused
  const acc_t sample_total = BlockReduce(tmp).Sum(loss_sum);
  if (threadIdx.x == 0) per_sample[blockIdx.x] = sample_total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sid_loss_cuda(
    const at::Tensor& y_real_in, const at::Tensor& y_fake_in, const at::Tensor& x_g_in,
    double alpha, bool normalize, int64_t reduction) {
  check_sid_loss_args(y_real_in, y_fake_in, x_g_in, reduction);
  const c10::cuda::CUDAGuard guard(x_g_in.device());
  auto [y_real, y_fake, x_g] = common_dense_layout(y_real_in, y_fake_in, x_g_in);
  auto out = allocate_sid_loss(x_g, reduction);
  const int64_t B = out.B, N = out.N;
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), "sid_loss: batch too large for the CUDA kernel");
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_g.scalar_type(), "sid_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t grad_scale = reduction == 2 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(1);
    sid_loss_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        y_real.const_data_ptr<scalar_t>(), y_fake.const_data_ptr<scalar_t>(), x_g.const_data_ptr<scalar_t>(),
        out.grad_real.mutable_data_ptr<scalar_t>(), out.grad_fake.mutable_data_ptr<scalar_t>(),
        out.grad_x.mutable_data_ptr<scalar_t>(), reduction == 0 ? out.loss_elem.mutable_data_ptr<acc_t>() : nullptr,
        out.per_sample.mutable_data_ptr<acc_t>(), N, static_cast<acc_t>(alpha), grad_scale, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  return finish_sid_loss(out, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(sidfast, CUDA, m) { m.impl("sid_loss", &sid_loss_cuda); }

}  // namespace sidfast
