// Operator registration of the compiled extension: schemas (TORCH_LIBRARY), the CPU,
// CUDA and Meta implementations, and the Python module that loads them.
//
// The public Python API (dsr_kernels.norm_modulate) validates the arguments with
// messages that name them before calling these ops; the TORCH_CHECKs here keep direct
// calls of torch.ops.dsr_kernels.* safe too. Autograd is registered from Python
// (torch.library.register_autograd), so the ops below are plain functions of tensors.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "dsr_kernels/cpu_capability.h"
#include "dsr_kernels/norm_modulate.h"
#include "dsr_kernels/ttr_activation.h"

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

// ----------------------------------------------------------------------------- ttr_activation

PatchValues parse_patch_values(c10::string_view s) {
  if (s == "zero") return PatchValues::Zero;
  if (s == "mean") return PatchValues::Mean;
  if (s == "only_outliers") return PatchValues::OnlyOutliers;
  if (s == "same") return PatchValues::Same;
  TORCH_CHECK(false, "ttr_activation: patch_values must be 'zero', 'mean', 'only_outliers' or 'same', got '",
              std::string(s), "'");
}

RegisterValue parse_register_value(c10::string_view s) {
  if (s == "signed_max") return RegisterValue::SignedMax;
  if (s == "max") return RegisterValue::Max;
  if (s == "layer_signed_max") return RegisterValue::LayerSignedMax;
  TORCH_CHECK(false, "ttr_activation: register_value must be 'signed_max', 'max' or 'layer_signed_max', got '",
              std::string(s), "'");
}

at::Tensor ttr_fwd(const at::Tensor& h, const at::Tensor& neurons, int64_t num_registers, int64_t num_prefix_tokens,
                   c10::string_view patch_values, c10::string_view register_value, bool tanh) {
  c10::OptionalDeviceGuard guard(h.device());
  TORCH_CHECK(h.dim() == 3, "ttr_activation: h must be [B, T, F], got ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "ttr_activation: h must be floating, got ", h.scalar_type());
  TORCH_CHECK(neurons.dim() == 1 && neurons.scalar_type() == at::kLong,
              "ttr_activation: neurons must be a 1-D int64 tensor, got ", neurons.sizes(), " ", neurons.scalar_type());
  TORCH_CHECK(neurons.device() == h.device() || neurons.is_cpu(), "ttr_activation: neurons is on ", neurons.device(),
              " but h is on ", h.device(), " (neurons may also be on the CPU)");
  TtrActivationArgs a;
  a.h = h.contiguous();
  a.B = h.size(0);
  a.T = h.size(1);
  a.F = h.size(2);
  a.K = neurons.size(0);
  a.prefix = num_prefix_tokens;
  a.registers = num_registers;
  a.patch_values = parse_patch_values(patch_values);
  a.register_value = parse_register_value(register_value);
  a.tanh = tanh;
  TORCH_CHECK(num_registers >= 1 && num_prefix_tokens >= 0 && num_prefix_tokens + num_registers <= a.T,
              "ttr_activation: need num_registers >= 1, num_prefix_tokens >= 0 and their sum <= T = ", a.T, ", got ",
              num_registers, " and ", num_prefix_tokens);
  // Every device checks the neurons on the host before any launch: range and duplicates.
  // Given on the CPU (as dsr_kernels.ttr_activation passes them), that costs no device
  // sync, and they reach the GPU by an asynchronous copy; given on the GPU, they are read
  // back once (a sync).
  const at::Tensor host = neurons.to(at::kCPU).contiguous();
  if (a.K) {
    const int64_t* n = host.const_data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(a.F), false);
    for (int64_t k = 0; k < a.K; ++k) {
      TORCH_CHECK(n[k] >= 0 && n[k] < a.F, "ttr_activation: neurons[", k, "] = ", n[k], " is not in [0, F = ", a.F,
                  ")");
      TORCH_CHECK(!seen[n[k]], "ttr_activation: neurons[", k, "] = ", n[k], " appears twice (neurons must be distinct)");
      seen[n[k]] = true;
    }
  }
  a.neurons = h.is_cpu() ? host : neurons.is_cpu() ? host.to(h.device(), /*non_blocking=*/true) : neurons.contiguous();
  at::Tensor out = at::empty_like(a.h);
  const auto acc = h.options().dtype(acc_type(h.scalar_type()));
  TtrColumnValues v;
  v.reg = at::empty({a.B, a.K}, acc);
  v.fill = at::empty({a.B, a.K}, acc);
  v.thresh = at::empty({a.B, a.K}, acc);
  if (out.numel() == 0) return out;
  if (h.is_cuda()) {
#ifdef DSR_WITH_CUDA
    if (a.K) ttr_column_values_cuda(a, v);
    ttr_activation_fwd_cuda(a, v, out);
#else
    TORCH_CHECK(false, "ttr_activation: this build of dsr_kernels has no CUDA kernels");
#endif
  } else {
    ttr_activation_cpu(a, v, out);
  }
  return out;
}

at::Tensor ttr_fwd_meta(const at::Tensor& h, const at::Tensor& neurons, int64_t num_registers,
                        int64_t num_prefix_tokens, c10::string_view patch_values, c10::string_view register_value,
                        bool tanh) {
  return at::empty_symint(h.sym_sizes(), h.options());
}

}  // namespace

TORCH_LIBRARY(dsr_kernels, m) {
  m.def(
      "norm_modulate_fwd(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, Tensor? registers, "
      "str kind, float eps, bool return_norms, bool return_moments) "
      "-> (Tensor out, Tensor residual, Tensor norms, Tensor moments, Tensor mean, Tensor rstd)");
  m.def(
      "norm_modulate_bwd(Tensor dout, Tensor? dresidual, Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, "
      "Tensor? bias, Tensor? registers, Tensor mean, Tensor rstd, str kind) "
      "-> (Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias, Tensor dregisters)");
  m.def(
      "ttr_activation_fwd(Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, "
      "str register_value, bool tanh) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsr_kernels, CPU, m) {
  m.impl("norm_modulate_fwd", &fwd);
  m.impl("norm_modulate_bwd", &bwd);
  m.impl("ttr_activation_fwd", &ttr_fwd);
}

#ifdef DSR_WITH_CUDA
TORCH_LIBRARY_IMPL(dsr_kernels, CUDA, m) {
  m.impl("norm_modulate_fwd", &fwd);
  m.impl("norm_modulate_bwd", &bwd);
  m.impl("ttr_activation_fwd", &ttr_fwd);
}
#endif

TORCH_LIBRARY_IMPL(dsr_kernels, Meta, m) {
  m.impl("norm_modulate_fwd", &fwd_meta);
  m.impl("norm_modulate_bwd", &bwd_meta);
  m.impl("ttr_activation_fwd", &ttr_fwd_meta);
}

}  // namespace dsr_kernels

#ifndef DSR_NO_PYTHON
#include <torch/extension.h>

// setup.py writes build_info.h (into build/generated/, not the source tree) with the
// reason it left the CUDA kernels out; other builds say only whether they are in.
#if __has_include("dsr_kernels/build_info.h")
#include "dsr_kernels/build_info.h"
#endif
#ifndef DSR_CUDA_SKIP_REASON
#ifdef DSR_WITH_CUDA
#define DSR_CUDA_SKIP_REASON ""
#else
#define DSR_CUDA_SKIP_REASON "built without DSR_WITH_CUDA"
#endif
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsr_kernels compiled kernels; the ops are registered under torch.ops.dsr_kernels";
  m.def("cuda_built", [] {
#ifdef DSR_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_skip_reason", [] { return std::string(DSR_CUDA_SKIP_REASON); },
        "why the CUDA kernels were not built (empty when they were), as setup.py decided it");
  m.def("cpu_capability", [] { return std::string(dsr_kernels::cpu_isa_name(dsr_kernels::cpu_isa())); },
        "the instruction set the CPU kernels picked at run time (avx512, avx2 or default)");
}
#endif
