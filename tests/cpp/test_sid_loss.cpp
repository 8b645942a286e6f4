// C++ check of sidfast::sid_loss against the same formula written with ATen ops
// (docs/math.md, "SiD generator loss").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sidfast::sid_loss", "")
                .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, int64_t)>();
  at::manual_seed(0);
  auto r = at::randn({4, 3, 5, 6}, at::kDouble), f = at::randn_like(r), x = at::randn_like(r);
  const double alpha = 1.2;
  auto [loss, gr, gf, gx] = op.call(r, f, x, alpha, true, 0);
  auto w = (x - r).abs().mean({1, 2, 3}, true).clamp_min(1e-5);
  auto d = r - f, e = r - x;
  const bool ok = at::allclose(loss, d * (e - alpha * d) / w, 1e-12, 1e-12) &&
                  at::allclose(gr, (e + (1 - 2 * alpha) * d) / w, 1e-12, 1e-12) &&
                  at::allclose(gf, (2 * alpha * d - e) / w, 1e-12, 1e-12) && at::allclose(gx, -d / w, 1e-12, 1e-12);
  std::printf("sid_loss C++ check: %s\n", ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}
