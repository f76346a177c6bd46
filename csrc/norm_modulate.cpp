// The op norm_modulate: schema, the device-generic wrappers that check the arguments,
// allocate the outputs and call the kernels of csrc/cpu/norm_modulate.cpp or
// csrc/cuda/norm_modulate.cu, the Meta kernels (shapes only, for FakeTensor /
// torch.compile), and their registration.
//
// The public Python API (dsr_kernels.norm_modulate) validates the arguments with
// messages that name them before calling these ops; the TORCH_CHECKs here keep direct
// calls of torch.ops.dsr_kernels.norm_modulate_* safe too. Autograd is registered from
// Python (dsr_kernels/ops/norm_modulate.py), so the ops below are plain functions of tensors.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "dsr_kernels/cpu_capability.h"
#include "dsr_kernels/norm_modulate.h"

namespace dsr_kernels {
namespace {

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

NormKind parse_kind(c10::string_view kind) {
  if (kind == "layernorm") return NormKind::LayerNorm;
  if (kind == "rmsnorm") return NormKind::RMSNorm;
  TORCH_CHECK(false, "norm_modulate: kind must be 'layernorm' or 'rmsnorm', got '", std::string(kind), "'");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Optional per-sample or per-channel parameter, checked and converted once to the
// accumulation type (a [B, D] or [D] tensor: negligible next to x).
at::Tensor param(const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == shape, "norm_modulate: ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "norm_modulate: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "norm_modulate: ", name, " is on ", t->device(), " but x is on ",
              x.device());
  return t->to(acc_type(x.scalar_type())).contiguous();
}

NormModulateArgs make_args(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& registers,
                           c10::string_view kind, double eps) {
  TORCH_CHECK(x.dim() == 3, "norm_modulate: x must be [B, N, D], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "norm_modulate: x must be floating, got ", x.scalar_type());
  TORCH_CHECK(eps > 0, "norm_modulate: eps must be > 0, got ", eps);
  NormModulateArgs a;
  a.x = x.contiguous();
  a.B = x.size(0);
  a.N = x.size(1);
  a.D = x.size(2);
  a.kind = parse_kind(kind);
  a.eps = eps;
  a.shift = param(shift, x, {a.B, a.D}, "shift");
  a.scale = param(scale, x, {a.B, a.D}, "scale");
  a.weight = param(weight, x, {a.D}, "weight");
  a.bias = param(bias, x, {a.D}, "bias");
  if (registers.has_value() && registers->defined()) {
    const at::Tensor& r = *registers;
    TORCH_CHECK((r.dim() == 2 && r.size(1) == a.D) || (r.dim() == 3 && r.size(0) == a.B && r.size(2) == a.D),
                "norm_modulate: registers must be [R, D] or [B, R, D] with D = ", a.D, ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "norm_modulate: registers must have x's dtype");
    TORCH_CHECK(r.device() == x.device(), "norm_modulate: registers must be on x's device");
    a.registers = r.contiguous();
    a.R = r.size(-2);
    a.shared_registers = r.dim() == 2;
  }
  return a;
}

at::Tensor empty_like_nothing(const at::Tensor& x) { return at::empty({0}, x.options()); }

FwdResult fwd(const at::Tensor& x, const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& registers, c10::string_view kind, double eps, bool return_norms,
              bool return_moments) {
  c10::OptionalDeviceGuard guard(x.device());
  NormModulateArgs a = make_args(x, shift, scale, weight, bias, registers, kind, eps);
  const int64_t T = a.tokens();
  const auto stat = x.options().dtype(acc_type(x.scalar_type()));
  NormModulateOutputs o;
  o.out = at::empty({a.B, T, a.D}, x.options());
  if (a.R) o.residual = at::empty({a.B, T, a.D}, x.options());
  if (return_norms) o.norms = at::empty({a.B, T}, stat);
  if (return_moments) o.moments = at::empty({a.B, T, 2}, stat);
  if (a.kind == NormKind::LayerNorm) o.mean = at::empty({a.B, T}, stat);
  o.rstd = at::empty({a.B, T}, stat);
  if (x.is_cpu()) {  // tens of MB each at DiT sizes: 2 MiB pages instead of one fault per 4 KiB
    advise_huge_pages(o.out);
    advise_huge_pages(o.residual);
  }
  if (a.B * T > 0 && a.D > 0) {
    if (x.is_cuda()) {
#ifdef DSR_WITH_CUDA
      norm_modulate_fwd_cuda(a, o);
#else
      TORCH_CHECK(false, "norm_modulate: this build of dsr_kernels has no CUDA kernels");
#endif
    } else {
      norm_modulate_fwd_cpu(a, o);
    }
  }
  auto or_empty = [&](const at::Tensor& t, const at::TensorOptions& opts) {
    return t.defined() ? t : at::empty({0}, opts);
  };
  return {o.out, or_empty(o.residual, x.options()), or_empty(o.norms, stat), or_empty(o.moments, stat),
          or_empty(o.mean, stat), o.rstd};
}

BwdResult bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dresidual, const at::Tensor& x,
              const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& registers, const at::Tensor& mean, const at::Tensor& rstd,
              c10::string_view kind) {
  c10::OptionalDeviceGuard guard(x.device());
  NormModulateArgs a = make_args(x, shift, scale, weight, bias, registers, kind, /*eps=*/1.0);
  const int64_t T = a.tokens(), C = chunks_per_sample(T);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({a.B, T, a.D}), "norm_modulate_bwd: dout must be [B, T, D]");
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor dres;
  if (dresidual.has_value() && dresidual->defined() && dresidual->numel()) dres = dresidual->contiguous();
  NormModulateGrads g;
  g.dx = at::empty_like(a.x);
  if (x.is_cpu()) advise_huge_pages(g.dx);
  if (a.R) g.dregisters = at::empty({a.B, a.R, a.D}, acc);
  if (a.shift.defined()) g.dshift_partial = at::empty({a.B, C, a.D}, acc);
  if (a.scale.defined()) g.dscale_partial = at::empty({a.B, C, a.D}, acc);
  if (a.weight.defined()) g.dweight_partial = at::empty({a.B, C, a.D}, acc);
  if (a.bias.defined()) g.dbias_partial = at::empty({a.B, C, a.D}, acc);
  const at::Tensor dout_c = dout.contiguous();
  const at::Tensor mean_c = a.kind == NormKind::LayerNorm ? mean.contiguous() : at::Tensor();
  const at::Tensor rstd_c = rstd.contiguous();
  if (a.B * T > 0 && a.D > 0) {
    if (x.is_cuda()) {
#ifdef DSR_WITH_CUDA
      norm_modulate_bwd_cuda(a, dout_c, dres, mean_c, rstd_c, g);
#else
      TORCH_CHECK(false, "norm_modulate: this build of dsr_kernels has no CUDA kernels");
#endif
    } else {
      norm_modulate_bwd_cpu(a, dout_c, dres, mean_c, rstd_c, g);
    }
  } else {
    for (at::Tensor* t : {&g.dregisters, &g.dshift_partial, &g.dscale_partial, &g.dweight_partial, &g.dbias_partial})
      if (t->defined()) t->zero_();
  }
  // Fixed-order reductions of the per-chunk partial sums: deterministic.
  auto reduce = [&](const at::Tensor& partial, at::IntArrayRef dims) {
    return partial.defined() ? partial.sum(dims).to(x.scalar_type()) : empty_like_nothing(x);
  };
  at::Tensor dregisters = empty_like_nothing(x);
  if (a.R) dregisters = (a.shared_registers ? g.dregisters.sum(0) : g.dregisters).to(x.scalar_type());
  return {g.dx, reduce(g.dshift_partial, {1}), reduce(g.dscale_partial, {1}), reduce(g.dweight_partial, {0, 1}),
          reduce(g.dbias_partial, {0, 1}), dregisters};
}

// Shapes only, for FakeTensor / torch.compile (symbolic sizes allowed).
FwdResult fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& registers,
                   c10::string_view kind, double eps, bool return_norms, bool return_moments) {
  const c10::SymInt B = x.sym_size(0), N = x.sym_size(1), D = x.sym_size(2);
  // R = 0 registers are no registers, as in the CPU and CUDA kernels (no residual output).
  const bool has_regs =
      registers.has_value() && registers->defined() && registers->sym_size(-2) != 0;
  const c10::SymInt T = has_regs ? registers->sym_size(-2) + N : N;
  const auto stat = x.options().dtype(acc_type(x.scalar_type()));
  const bool layernorm = parse_kind(kind) == NormKind::LayerNorm;
  auto sized = [](std::initializer_list<c10::SymInt> s, bool keep, const at::TensorOptions& o) {
    return keep ? at::empty_symint(c10::SymIntArrayRef(s.begin(), s.size()), o) : at::empty({0}, o);
  };
  return {at::empty_symint({B, T, D}, x.options()), sized({B, T, D}, has_regs, x.options()),
          sized({B, T}, return_norms, stat), sized({B, T, 2}, return_moments, stat), sized({B, T}, layernorm, stat),
          at::empty_symint({B, T}, stat)};
}

BwdResult bwd_meta(const at::Tensor& dout, const std::optional<at::Tensor>& dresidual, const at::Tensor& x,
                   const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& registers, const at::Tensor& mean, const at::Tensor& rstd,
                   c10::string_view kind) {
  auto like = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? at::empty_symint(t->sym_sizes(), t->options()) : at::empty({0}, x.options());
  };
  const bool has_regs =
      registers.has_value() && registers->defined() && registers->sym_size(-2) != 0;
  return {at::empty_symint(x.sym_sizes(), x.options()), like(shift), like(scale), like(weight), like(bias),
          has_regs ? like(registers) : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace dsr_kernels

TORCH_LIBRARY_FRAGMENT(dsr_kernels, m) {
  m.def(
      "norm_modulate_fwd(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, Tensor? registers, "
      "str kind, float eps, bool return_norms, bool return_moments) "
      "-> (Tensor out, Tensor residual, Tensor norms, Tensor moments, Tensor mean, Tensor rstd)");
  m.def(
      "norm_modulate_bwd(Tensor dout, Tensor? dresidual, Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, "
      "Tensor? bias, Tensor? registers, Tensor mean, Tensor rstd, str kind) "
      "-> (Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias, Tensor dregisters)");
}

TORCH_LIBRARY_IMPL(dsr_kernels, CPU, m) {
  m.impl("norm_modulate_fwd", &dsr_kernels::fwd);
  m.impl("norm_modulate_bwd", &dsr_kernels::bwd);
}

#ifdef DSR_WITH_CUDA
TORCH_LIBRARY_IMPL(dsr_kernels, CUDA, m) {
  m.impl("norm_modulate_fwd", &dsr_kernels::fwd);
  m.impl("norm_modulate_bwd", &dsr_kernels::bwd);
}
#endif

TORCH_LIBRARY_IMPL(dsr_kernels, Meta, m) {
  m.impl("norm_modulate_fwd", &dsr_kernels::fwd_meta);
  m.impl("norm_modulate_bwd", &dsr_kernels::bwd_meta);
}
