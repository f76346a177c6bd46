// C++ test of the CPU kernels (run with ctest, once per instruction set: DSR_CPU_CAPABILITY,
// and in CI under AddressSanitizer + UBSan): the registered ops against the same
// computation written with ATen ops in float64, forward and backward (autograd).
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using torch::Tensor;

struct Case {
  int64_t B, N, D, R;
  bool shared, rms, modulate, affine;
  at::ScalarType dtype;
  bool unaligned = false;  // x and registers one element into their storage (contiguous, not 16-byte aligned)
};

std::string describe(const Case& c) {
  return "B" + std::to_string(c.B) + " N" + std::to_string(c.N) + " D" + std::to_string(c.D) + " R" +
         std::to_string(c.R) + (c.shared ? " shared" : " per-sample") + (c.rms ? " rmsnorm" : " layernorm") +
         (c.modulate ? " modulate" : "") + (c.affine ? " affine" : "") + (c.unaligned ? " unaligned" : "") + " " +
         c10::toString(c.dtype);
}

// The definition, in float64 ATen ops (what dsr_kernels.reference.norm_modulate says).
std::vector<Tensor> reference(const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& w,
                              const Tensor& b, const Tensor& regs, bool rms) {
  Tensor h = x;
  if (regs.defined()) h = torch::cat({regs.dim() == 2 ? regs.expand({x.size(0), -1, -1}) : regs, x}, 1);
  Tensor y;
  if (rms) {
    y = h * torch::rsqrt(h.square().mean(-1, true) + 1e-6);
  } else {
    Tensor mean = h.mean(-1, true);
    y = (h - mean) * torch::rsqrt((h - mean).square().mean(-1, true) + 1e-6);
  }
  if (w.defined()) y = y * w;
  if (b.defined()) y = y + b;
  if (scale.defined()) y = y * (1 + scale.unsqueeze(1));
  if (shift.defined()) y = y + shift.unsqueeze(1);
  return {y, h, torch::linalg_vector_norm(h, 2, {-1}, false, c10::nullopt)};
}

int failures = 0;

void expect_close(const std::string& what, const Tensor& got, const Tensor& ref, double atol) {
  const double err = (got.to(torch::kDouble) - ref.to(torch::kDouble)).abs().max().item<double>();
  if (!(err <= atol)) {
    std::printf("FAIL %s: max |err| %.3g > %.3g\n", what.c_str(), err, atol);
    ++failures;
  }
}

void run(const Case& c) {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  Tensor x = torch::randn({c.B, c.N, c.D}, opts) * 2 + 0.5;
  Tensor shift, scale, w, b, regs;
  if (c.modulate) {
    shift = torch::randn({c.B, c.D}, opts) * 0.5;
    scale = torch::randn({c.B, c.D}, opts) * 0.5;
  }
  if (c.affine) {
    w = torch::randn({c.D}, opts) * 0.2 + 1;
    b = torch::randn({c.D}, opts) * 0.2;
  }
  if (c.R) regs = c.shared ? torch::randn({c.R, c.D}, opts) : torch::randn({c.B, c.R, c.D}, opts);
  auto cast = [&](const Tensor& t) {
    if (!t.defined()) return t;
    if (!c.unaligned) return t.to(c.dtype);
    Tensor v = torch::empty({t.numel() + 1}, t.options().dtype(c.dtype)).narrow(0, 1, t.numel()).view(t.sizes());
    return v.copy_(t);
  };
  // Inputs rounded to the tested dtype, so the reference sees exactly what the kernel sees.
  for (Tensor* t : {&x, &shift, &scale, &w, &b, &regs})
    if (t->defined()) *t = cast(*t).to(torch::kDouble);
  auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };

  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("dsr_kernels::norm_modulate_fwd", "")
                        .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                            const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                            const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                            c10::string_view, double, bool, bool)>();
  static auto bwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("dsr_kernels::norm_modulate_bwd", "")
                        .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                            const Tensor&, const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
                            const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                            const std::optional<Tensor>&, const Tensor&, const Tensor&, c10::string_view)>();
  const char* kind = c.rms ? "rmsnorm" : "layernorm";
  auto [out, residual, norms, moments, mean, rstd] =
      fwd.call(cast(x), opt(cast(shift)), opt(cast(scale)), opt(cast(w)), opt(cast(b)), opt(cast(regs)), kind, 1e-6,
               true, true);

  // Reference with autograd, in float64.
  std::vector<Tensor> leaves;
  auto leaf = [&](const Tensor& t) {
    if (!t.defined()) return t;
    Tensor l = t.detach().clone().requires_grad_(true);
    leaves.push_back(l);
    return l;
  };
  Tensor lx = leaf(x), lshift = leaf(shift), lscale = leaf(scale), lw = leaf(w), lb = leaf(b), lregs = leaf(regs);
  auto ref = reference(lx, lshift, lscale, lw, lb, lregs, c.rms);
  const double eps = c.dtype == torch::kFloat ? 1e-5 : c.dtype == torch::kDouble ? 1e-10 : 8e-2;
  const double scale_out = ref[0].abs().max().item<double>() + 1;
  expect_close(describe(c) + " out", out, ref[0], eps * scale_out);
  expect_close(describe(c) + " norms", norms, ref[2], 1e-5 * (ref[2].abs().max().item<double>() + 1));
  if (c.R) expect_close(describe(c) + " residual", residual, ref[1].to(c.dtype), 0.0);
  expect_close(describe(c) + " moments max", moments.select(-1, 0), ref[1].abs().amax(-1), 1e-6 * scale_out);

  if (c.dtype != torch::kFloat && c.dtype != torch::kDouble) return;  // gradients: float and double
  Tensor dout = torch::randn_like(ref[0]);
  Tensor dres = c.R ? torch::randn_like(ref[1]) : Tensor();
  Tensor loss = (ref[0] * dout).sum();
  if (c.R) loss = loss + (ref[1] * dres).sum();
  auto ref_grads = torch::autograd::grad({loss}, leaves);
  auto [dx, dshift, dscale, dw, db, dregs] =
      bwd.call(cast(dout), opt(cast(dres)), cast(x), opt(cast(shift)), opt(cast(scale)), opt(cast(w)), opt(cast(b)),
               opt(cast(regs)), mean, rstd, kind);
  std::vector<std::pair<const char*, Tensor>> got = {{"dx", dx}};
  if (c.modulate) got.insert(got.end(), {{"dshift", dshift}, {"dscale", dscale}});
  if (c.affine) got.insert(got.end(), {{"dweight", dw}, {"dbias", db}});
  if (c.R) got.push_back({"dregisters", dregs});
  for (size_t i = 0; i < got.size(); ++i) {
    const double mag = ref_grads[i].abs().max().item<double>() + 1;
    expect_close(describe(c) + " " + got[i].first, got[i].second, ref_grads[i], (c.dtype == torch::kFloat ? 2e-5 : 1e-10) * mag);
  }
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {2, 257, 72, 36, true, false, true, false, torch::kFloat},
      {2, 1, 1153, 1, false, true, true, true, torch::kFloat},
      {1, 7, 1152, 0, true, false, false, true, torch::kDouble},
      {3, 33, 72, 36, false, false, true, true, torch::kDouble},
      {2, 256, 1152, 36, true, false, true, false, torch::kBFloat16},
      {2, 292, 1153, 0, true, true, true, true, torch::kHalf},
      // Rows shorter than one vector, and tails (the vector code works in blocks of 16 floats).
      {1, 3, 1, 2, true, false, true, false, torch::kFloat},
      {2, 5, 17, 3, false, true, true, true, torch::kBFloat16, true},
      {2, 4, 5, 1, true, false, true, true, torch::kHalf, true},
      {1, 9, 16, 0, true, true, false, false, torch::kFloat, true},
      {2, 6, 33, 2, true, false, true, true, torch::kFloat, true},
  };
  for (const Case& c : cases) run(c);
  std::printf("%s: %zu cases, %d failures\n", failures ? "FAILED" : "OK", cases.size(), failures);
  return failures ? 1 : 0;
}
