// C++ test of the CPU attention kernel (run with ctest, once per instruction set:
// DSR_CPU_CAPABILITY, and in CI under AddressSanitizer + UBSan): forward (out, lse and
// the statistics) and backward against the same computation written with ATen ops in
// float64 (autograd for the gradients), on sizes that are not block multiples.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "dsr_kernels/attention.h"

namespace {

using torch::Tensor;

struct Case {
  int64_t B, H, Nq, Nk, D, R;
  bool shared, sinks, key_mask, causal, bool_mask;
  int64_t prefix;
};

std::string describe(const Case& c) {
  return "B" + std::to_string(c.B) + " H" + std::to_string(c.H) + " Nq" + std::to_string(c.Nq) + " Nk" +
         std::to_string(c.Nk) + " D" + std::to_string(c.D) + " R" + std::to_string(c.R) +
         (c.shared ? " shared" : " per-sample") + (c.sinks ? " sinks" : "") + (c.key_mask ? " key_mask" : "") +
         (c.causal ? " causal" : "") + (c.bool_mask ? " attn_mask" : "");
}

// out, lse, entropy, register share, key mass: the definition (dsr_kernels/reference/attention.py).
std::vector<Tensor> reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rk, const Tensor& rv,
                              const Tensor& sinks, const Tensor& allowed, double scale, int64_t prefix) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  Tensor s = torch::matmul(q, k.transpose(-1, -2)) * scale;
  s = s.masked_fill(allowed.logical_not(), -INFINITY);
  std::vector<Tensor> logits{s}, values{v};
  int64_t R = 0;
  if (rk.defined()) {
    Tensor rke = rk.dim() == 3 ? rk.expand({B, H, -1, D}) : rk;
    Tensor rve = rv.dim() == 3 ? rv.expand({B, H, -1, D}) : rv;
    R = rke.size(2);
    logits.insert(logits.begin(), torch::matmul(q, rke.transpose(-1, -2)) * scale);
    values.insert(values.begin(), rve);
  }
  if (sinks.defined()) logits.push_back(sinks.view({1, H, 1, 1}).expand({B, H, Nq, 1}));
  Tensor L = torch::cat(logits, -1);
  Tensor lse = torch::logsumexp(L, -1);
  Tensor p = torch::exp(L - lse.unsqueeze(-1));
  Tensor pk = p.narrow(-1, 0, L.size(-1) - (sinks.defined() ? 1 : 0));
  Tensor out = torch::matmul(pk, torch::cat(values, 2));
  Tensor entropy = -torch::special_xlogy(p, p).sum(-1);
  Tensor share = pk.narrow(-1, 0, R + prefix).sum(-1);
  return {out, lse, entropy, share, pk.sum(-2)};
}

double max_err(const Tensor& a, const Tensor& b) { return (a.to(torch::kDouble) - b).abs().max().item<double>(); }

bool run(const Case& c) {
  torch::manual_seed(0);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  Tensor q = torch::randn({c.B, c.H, c.Nq, c.D}, f32), k = torch::randn({c.B, c.H, c.Nk, c.D}, f32);
  Tensor v = torch::randn({c.B, c.H, c.Nk, c.D}, f32);
  std::optional<Tensor> rk, rv, sinks, key_mask;
  if (c.R) {
    std::vector<int64_t> shape = c.shared ? std::vector<int64_t>{c.H, c.R, c.D} : std::vector<int64_t>{c.B, c.H, c.R, c.D};
    rk = torch::randn(shape, f32) * 2, rv = torch::randn(shape, f32);
  }
  if (c.sinks) sinks = torch::randn({c.H}, f32);
  Tensor allowed = torch::ones({c.B, c.H, c.Nq, c.Nk}, torch::kBool);
  if (c.key_mask) {
    key_mask = torch::rand({c.B, c.Nk}) > 0.3;
    allowed = allowed.logical_and(key_mask->view({c.B, 1, 1, c.Nk}));
  }
  if (c.causal) {  // bottom-right aligned: offset Nk - Nq
    Tensor i = torch::arange(c.Nq).view({-1, 1}), j = torch::arange(c.Nk).view({1, -1});
    allowed = allowed.logical_and(j <= i + (c.Nk - c.Nq));
  }
  std::optional<Tensor> attn_mask;
  if (c.bool_mask) {
    attn_mask = (torch::rand({c.B, 1, c.Nq, c.Nk}) > 0.4).expand({c.B, c.H, c.Nq, c.Nk});
    allowed = allowed.logical_and(*attn_mask);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  Tensor out = torch::empty({c.B, c.Nq, c.H, c.D}, f32).transpose(1, 2);
  Tensor lse = torch::empty({c.B, c.H, c.Nq}, f32), entropy = torch::empty_like(lse), share = torch::empty_like(lse);
  Tensor mass = torch::empty({c.B, c.H, c.R + c.Nk}, f32);
  dsr_kernels::AttentionArgs args;
  args.q = q, args.k = k, args.v = v, args.rk = rk, args.rv = rv, args.sinks = sinks;
  args.key_mask = key_mask, args.attn_mask = attn_mask, args.num_prefix_tokens = c.prefix, args.scale = scale;
  args.causal = c.causal ? dsr_kernels::Causal::kBottomRight : dsr_kernels::Causal::kNone;
  args.return_stats = true;
  dsr_kernels::attention_fwd_cpu(args, {out, lse, entropy, share, mass});

  auto leaf = [](const Tensor& t) { return t.to(torch::kDouble).detach().requires_grad_(true); };
  Tensor qd = leaf(q), kd = leaf(k), vd = leaf(v);
  Tensor rkd = rk ? leaf(*rk) : Tensor(), rvd = rv ? leaf(*rv) : Tensor(), sd = sinks ? leaf(*sinks) : Tensor();
  std::vector<Tensor> ref = reference(qd, kd, vd, rkd, rvd, sd, allowed, scale, c.prefix);
  bool ok = true;
  const char* names[] = {"out", "lse", "entropy", "register_share", "key_mass"};
  std::vector<Tensor> got{out, lse, entropy, share, mass};
  for (size_t i = 0; i < got.size(); ++i) {
    Tensor r = ref[i].detach();
    // rows that attend nothing: lse = -inf in both; compare the finite entries
    Tensor finite = torch::isfinite(r);
    if (!torch::equal(finite, torch::isfinite(got[i]))) {
      std::printf("FAIL %s: %s infinities differ\n", describe(c).c_str(), names[i]);
      ok = false;
      continue;
    }
    const double err = max_err(got[i].masked_fill(finite.logical_not(), 0), r.masked_fill(finite.logical_not(), 0));
    if (err > 2e-4) {
      std::printf("FAIL %s: %s max error %.3g\n", describe(c).c_str(), names[i], err);
      ok = false;
    }
  }

  Tensor dout = torch::randn({c.B, c.H, c.Nq, c.D}, f32);
  std::vector<Tensor> wrt{qd, kd, vd};
  if (c.R) wrt.push_back(rkd), wrt.push_back(rvd);
  if (c.sinks) wrt.push_back(sd);
  std::vector<Tensor> grads = torch::autograd::grad({ref[0]}, wrt, {dout.to(torch::kDouble)});
  Tensor dq = torch::empty({c.B, c.Nq, c.H, c.D}, f32).transpose(1, 2);
  Tensor dk = torch::empty({c.B, c.Nk, c.H, c.D}, f32).transpose(1, 2), dv = torch::empty_like(dk);
  std::optional<Tensor> drk, drv, dsinks;
  if (c.R) drk = torch::empty_like(*rk), drv = torch::empty_like(*rv);
  if (c.sinks) dsinks = torch::empty({c.H}, f32);
  dsr_kernels::attention_bwd_cpu(args, dout, out, lse, {dq, dk, dv, drk, drv, dsinks});
  std::vector<Tensor> mine{dq, dk, dv};
  if (c.R) mine.push_back(*drk), mine.push_back(*drv);
  if (c.sinks) mine.push_back(*dsinks);
  for (size_t i = 0; i < mine.size(); ++i) {
    const double err = max_err(mine[i], grads[i]);
    if (!(err <= 5e-4)) {
      std::printf("FAIL %s: gradient %zu max error %.3g\n", describe(c).c_str(), i, err);
      ok = false;
    }
  }
  // The key mass from the backward (key_mass_in_backward): the forward's, up to float32 rounding,
  // and the same gradients bit for bit.
  args.key_mass_in_backward = true;
  Tensor mass_bwd = torch::full_like(mass, NAN), dq2 = torch::empty_like(dq), dk2 = torch::empty_like(dk);
  Tensor dv2 = torch::empty_like(dv);
  std::optional<Tensor> drk2, drv2, dsinks2;
  if (c.R) drk2 = torch::empty_like(*rk), drv2 = torch::empty_like(*rv);
  if (c.sinks) dsinks2 = torch::empty({c.H}, f32);
  dsr_kernels::attention_bwd_cpu(args, dout, out, lse, {dq2, dk2, dv2, drk2, drv2, dsinks2, mass_bwd});
  const double mass_err = max_err(mass_bwd, mass);
  if (!(mass_err <= 1e-4 * std::max<double>(1.0, c.Nq)) || !torch::equal(dq2, dq) || !torch::equal(dk2, dk)) {
    std::printf("FAIL %s: backward key mass max error %.3g (or gradients changed)\n", describe(c).c_str(), mass_err);
    ok = false;
  }
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", describe(c).c_str());
  return ok;
}

// The NaN contract and the row-stride check: a NaN key poisons every row that attends it,
// in any vector lane; rows that overlap are an error, never handed to BLAS.
bool run_edge_cases() {
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  bool ok = true;
  for (int64_t j = 0; j < 40; ++j) {
    Tensor q = torch::randn({1, 1, 40, 16}, f32), k = torch::randn({1, 1, 40, 16}, f32);
    Tensor v = torch::randn({1, 1, 40, 16}, f32);
    k.index_put_({0, 0, j, 0}, NAN);
    Tensor out = torch::empty({1, 1, 40, 16}, f32), lse = torch::empty({1, 1, 40}, f32);
    Tensor ent = torch::empty_like(lse), share = torch::empty_like(lse), mass = torch::empty({1, 1, 40}, f32);
    dsr_kernels::AttentionArgs args;
    args.q = q, args.k = k, args.v = v, args.scale = 0.25, args.return_stats = true;
    dsr_kernels::attention_fwd_cpu(args, {out, lse, ent, share, mass});
    if (!out.isnan().all().item<bool>() || !lse.isnan().all().item<bool>() || !mass.isnan().all().item<bool>()) {
      std::printf("FAIL a NaN in key %lld did not reach every row\n", static_cast<long long>(j));
      ok = false;
    }
  }
  Tensor q = torch::randn({1, 1, 1, 16}, f32).expand({1, 1, 9, 16}), k = torch::randn({1, 1, 9, 16}, f32);
  Tensor out = torch::empty({1, 1, 9, 16}, f32), lse = torch::empty({1, 1, 9}, f32), none = torch::empty({0}, f32);
  try {
    dsr_kernels::AttentionArgs args;
    args.q = q, args.k = k, args.v = k, args.scale = 0.25;
    dsr_kernels::attention_fwd_cpu(args, {out, lse, none, none, none});
    std::printf("FAIL expanded query rows were accepted\n");
    ok = false;
  } catch (const c10::Error&) {
  }
  std::printf("%s NaN keys in every lane; overlapping rows rejected\n", ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {2, 3, 37, 37, 72, 5, true, true, true, false, false, 2},
      {1, 2, 257, 292, 80, 36, true, false, false, true, false, 0},
      {2, 2, 33, 40, 16, 1, false, true, false, false, true, 1},
      {1, 1, 70, 65, 8, 0, true, false, true, false, false, 0},  // no register, no sink: every row keeps a key
      {2, 1, 5, 300, 1, 3, false, true, true, false, true, 3},
      {1, 1, 600, 600, 16, 3, true, true, false, true, false, 0},  // key mass summed over 3 parts
  };
  bool ok = run_edge_cases();
  for (const Case& c : cases) ok = run(c) && ok;
  std::printf("%s\n", ok ? "all passed" : "FAILED");
  return ok ? 0 : 1;
}
