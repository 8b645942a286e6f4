// CPU implementation of sidfast::sid_loss: per sample, one pass for the NaN check and the L1
// normalizer, one pass for the loss and all three gradients. Parallel over samples; fp32 (fp64 for
// double inputs) element math, double accumulation of the per-sample sums.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace sidfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sid_loss_cpu(
    const at::Tensor& y_real_in, const at::Tensor& y_fake_in, const at::Tensor& x_g_in,
    double alpha, bool normalize, int64_t reduction) {
  check_sid_loss_args(y_real_in, y_fake_in, x_g_in, reduction);
  auto [y_real, y_fake, x_g] = common_dense_layout(y_real_in, y_fake_in, x_g_in);
  auto out = allocate_sid_loss(x_g, reduction);
  const int64_t B = out.B, N = out.N;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_g.scalar_type(), "sid_loss_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pr = y_real.const_data_ptr<scalar_t>();
    const scalar_t* pf = y_fake.const_data_ptr<scalar_t>();
    const scalar_t* px = x_g.const_data_ptr<scalar_t>();
    scalar_t* gr = out.grad_real.mutable_data_ptr<scalar_t>();
    scalar_t* gf = out.grad_fake.mutable_data_ptr<scalar_t>();
    scalar_t* gx = out.grad_x.mutable_data_ptr<scalar_t>();
    loss_t* ps = out.per_sample.mutable_data_ptr<loss_t>();
    loss_t* le = reduction == 0 ? out.loss_elem.mutable_data_ptr<loss_t>() : nullptr;
    const opmath_t a = static_cast<opmath_t>(alpha);
    const opmath_t grad_scale = reduction == 2 ? opmath_t(1) / static_cast<opmath_t>(B) : opmath_t(1);

    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * N;
        bool has_nan = false;
        double abs_sum = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          const opmath_t r = pr[off + i], f = pf[off + i], x = px[off + i];
          has_nan |= std::isnan(r) || std::isnan(f) || std::isnan(x);
          abs_sum += std::abs(static_cast<double>(x - r));
        }
        if (has_nan) {  // the published code drops the sample: it contributes nothing
          for (int64_t i = 0; i < N; ++i) {
            gr[off + i] = gf[off + i] = gx[off + i] = scalar_t(0);
            if (le) le[off + i] = loss_t(0);
          }
          ps[b] = loss_t(0);
          continue;
        }
        // w = max(mean |x_g - y_real|, 1e-5), treated as a constant
        // (docs/math.md, "SiD generator loss")
        const opmath_t w = normalize ? static_cast<opmath_t>(std::max(abs_sum / N, 1e-5)) : opmath_t(1);
        const opmath_t g = grad_scale / w;
        double total = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          const opmath_t r = pr[off + i], f = pf[off + i], x = px[off + i];
          const opmath_t d = r - f, e = r - x;
          const opmath_t l = d * (e - a * d) / w;
          total += l;
          if (le) le[off + i] = static_cast<loss_t>(l);
          gr[off + i] = static_cast<scalar_t>((e + (opmath_t(1) - opmath_t(2) * a) * d) * g);
          gf[off + i] = static_cast<scalar_t>((opmath_t(2) * a * d - e) * g);
          gx[off + i] = static_cast<scalar_t>(-d * g);
        }
        ps[b] = static_cast<loss_t>(total);
      }
    });
  });

  return finish_sid_loss(out, reduction);
}

TORCH_LIBRARY_IMPL(sidfast, CPU, m) { m.impl("sid_loss", &sid_loss_cpu); }

}  // namespace sidfast
