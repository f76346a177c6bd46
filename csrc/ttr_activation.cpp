// The op ttr_activation: schema, the device-generic wrapper that checks the arguments
// (the neurons on the host, before any launch), allocates the output and calls the
// kernels of csrc/cpu/ttr_activation.cpp or csrc/cuda/ttr_activation.cu, the Meta kernel,
// and their registration.
//
// The public Python API (dsr_kernels.ttr_activation) validates the arguments with
// messages that name them before calling this op; the TORCH_CHECKs here keep direct calls
// of torch.ops.dsr_kernels.ttr_activation_fwd safe too. Autograd and the backward op
// (PyTorch ops on the selected columns) are registered from Python
// (dsr_kernels/ops/ttr_activation.py).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "dsr_kernels/ttr_activation.h"

namespace dsr_kernels {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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
}  // namespace dsr_kernels

TORCH_LIBRARY_FRAGMENT(dsr_kernels, m) {
  m.def(
      "ttr_activation_fwd(Tensor h, Tensor neurons, int num_registers, int num_prefix_tokens, str patch_values, "
      "str register_value, bool tanh) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsr_kernels, CPU, m) { m.impl("ttr_activation_fwd", &dsr_kernels::ttr_fwd); }

#ifdef DSR_WITH_CUDA
TORCH_LIBRARY_IMPL(dsr_kernels, CUDA, m) { m.impl("ttr_activation_fwd", &dsr_kernels::ttr_fwd); }
#endif

TORCH_LIBRARY_IMPL(dsr_kernels, Meta, m) { m.impl("ttr_activation_fwd", &dsr_kernels::ttr_fwd_meta); }
