"""dsr_kernels.attention: every backend against the float64 reference.

On a CPU machine the Triton kernels run in Triton's interpreter (conftest switches it
on); tests marked ``gpu`` run them for real on CUDA. Shapes are small but awkward: not
multiples of any block size, head dims that are not powers of two, R = 0 / 1 / 36 / 65.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsr_kernels
from dsr_kernels import AttentionStats, BackendUnavailable, attention
from dsr_kernels.attention_call import AttentionCall, Causal
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.ops import attention as attention_ops
from dsr_kernels.reference.attention import attention_ref
from dsr_kernels.rope import rope_1d_tables
from utils import assert_close, assert_within_eager_error


@dataclass(frozen=True)
class Case:
    B: int = 1
    H: int = 2
    Nq: int = 113
    Nk: int = 113
    D: int = 64
    R: int = 0
    per_sample_registers: bool = False
    sinks: bool = False
    key_mask: bool = False
    causal: bool = False
    attn_mask: str | None = None  # None | "bool" | "float"
    prefix: int = 0
    rope: str | None = None  # None | "interleaved" | "half" (self-attention only)
    dtype: torch.dtype = torch.float32
    Hk: int | None = None  # K/V heads (grouped-query attention); None: H
    Dv: int | None = None  # value head dim; None: D

    @property
    def kv_heads(self) -> int:
        return self.H if self.Hk is None else self.Hk

    @property
    def value_dim(self) -> int:
        return self.D if self.Dv is None else self.Dv

    def __str__(self) -> str:
        parts = [f"B{self.B}H{self.H}", f"q{self.Nq}k{self.Nk}", f"d{self.D}", f"r{self.R}"]
        parts += [n for n in ("per_sample_registers", "sinks", "key_mask", "causal") if getattr(self, n)]
        parts += [f"{self.attn_mask}_mask"] if self.attn_mask else []
        parts += [f"prefix{self.prefix}"] if self.prefix else []
        parts += [f"rope_{self.rope}"] if self.rope else []
        parts += [f"hk{self.Hk}"] if self.Hk is not None else []
        parts += [f"dv{self.Dv}"] if self.Dv is not None else []
        return "-".join(parts + [str(self.dtype).replace("torch.", "")])


# Each value named in the issue appears at least once; combinations are spread so that
# the interpreter run stays short.
CASES = [
    Case(Nq=292, Nk=292, D=72, R=36, prefix=0),  # DSR DiT-XL: 256 + 36, head dim 72
    Case(Nq=257, Nk=257, D=64, dtype=torch.bfloat16),
    Case(
        B=2,
        Nq=113,
        Nk=113,
        D=80,
        R=4,
        per_sample_registers=True,
        sinks=True,
        key_mask=True,
        prefix=3,
        dtype=torch.float16,
    ),
    Case(Nq=7, Nk=7, D=16, R=1, sinks=True, causal=True),
    Case(B=2, H=1, Nq=1, Nk=1, D=128),
    Case(Nq=1, Nk=113, D=72, R=36, per_sample_registers=True, key_mask=True, dtype=torch.bfloat16),
    Case(H=3, Nq=113, Nk=257, D=128, R=4, sinks=True, causal=True, dtype=torch.bfloat16),
    Case(Nq=257, Nk=113, D=96, R=1, key_mask=True, causal=True, dtype=torch.float16),
    Case(Nq=113, Nk=7, D=80, causal=True),  # bottom-right causal: early queries see nothing
    Case(B=2, Nq=113, Nk=113, D=72, R=4, attn_mask="float", prefix=5),
    Case(B=2, Nq=7, Nk=292, D=80, attn_mask="bool", sinks=True, dtype=torch.bfloat16),
    Case(H=1, Nq=64, Nk=71, D=256, R=4, dtype=torch.float16),
    Case(H=1, Nq=65, Nk=64, D=160, R=1, sinks=True, dtype=torch.bfloat16),
    Case(Nq=33, Nk=40, D=40, R=65, per_sample_registers=True, prefix=40),
    Case(B=2, Nq=50, Nk=50, D=64, R=36, key_mask=True, dtype=torch.float16),
    # In-kernel RoPE: LightningDiT after register_start (36 in-sequence registers, not rotated).
    Case(Nq=292, Nk=292, D=72, prefix=36, rope="interleaved", dtype=torch.bfloat16),
    Case(Nq=113, Nk=113, D=80, R=4, sinks=True, rope="half", causal=True),
    Case(B=2, Nq=57, Nk=57, D=64, R=1, key_mask=True, rope="interleaved", dtype=torch.float16),
    # Grouped-query attention (K/V read in place) and MQA.
    Case(B=2, H=4, Hk=2, Nq=113, Nk=203, D=72, R=4, sinks=True, key_mask=True, prefix=2),
    Case(H=3, Hk=1, Nq=147, Nk=147, D=80, R=1, per_sample_registers=True, causal=True, dtype=torch.bfloat16),
    Case(H=4, Hk=2, Nq=57, Nk=57, D=64, rope="half", attn_mask="float", dtype=torch.float16),
]

# A value head dim different from the key head dim (each kernel tiles v, out and dO by their own).
VALUE_DIM_CASES = [
    Case(B=2, Nq=113, Nk=57, D=72, Dv=40, R=36, sinks=True, key_mask=True),
    Case(H=4, Hk=2, Nq=65, Nk=65, D=32, Dv=80, R=1, causal=True, rope="interleaved", dtype=torch.bfloat16),
    Case(Nq=29, Nk=31, D=16, Dv=3, R=4, per_sample_registers=True, attn_mask="bool", dtype=torch.float16),
]


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()) + seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=case.dtype)

    B, H, D = case.B, case.H, case.D
    Hk, Dv = case.kv_heads, case.value_dim
    inputs = dict(q=rand(B, H, case.Nq, D), k=rand(B, Hk, case.Nk, D), v=rand(B, Hk, case.Nk, Dv))
    if case.R:
        shape = (B, H, case.R) if case.per_sample_registers else (H, case.R)
        # Large register keys: registers take a real share of the attention, as they do.
        inputs["kv_registers"] = (rand(*shape, D, scale=2.0), rand(*shape, Dv))
    if case.sinks:
        inputs["sinks"] = (torch.randn(H, generator=g) + 1.0).to(device)
    if case.key_mask:
        km = torch.rand(B, case.Nk, generator=g) > 0.3
        km[-1] = False  # the last sample attends registers (or nothing) only
        inputs["key_mask"] = km.to(device)
    if case.attn_mask == "bool":
        inputs["attn_mask"] = (torch.rand(B, 1, case.Nq, case.Nk, generator=g) > 0.5).to(device)
    elif case.attn_mask == "float":
        inputs["attn_mask"] = (torch.randn(1, H, case.Nq, case.Nk, generator=g) * 2).to(device)
    if case.rope:
        inputs["rope"] = rope_tables(case.Nq, D, case.rope, identity_rows=case.prefix, device=device)
        inputs["rope_style"] = case.rope
    return inputs


def rope_tables(n: int, d: int, style: str, *, identity_rows: int = 0, device="cpu"):
    """1D rotary tables whose first rows leave their tokens unrotated (registers)."""
    cos, sin = rope_1d_tables(n, d, style=style, theta=100.0)
    cos[:identity_rows], sin[:identity_rows] = 1.0, 0.0
    return cos.to(device), sin.to(device)


def differentiable(inputs: dict) -> list[str]:
    names = ["q", "k", "v"] + (["rk", "rv"] if "kv_registers" in inputs else [])
    return names + (["sinks"] if "sinks" in inputs else [])


def leaves(inputs: dict, dtype: torch.dtype | None) -> tuple[dict, list[torch.Tensor]]:
    """Fresh leaf copies (optionally cast) and the list of tensors to differentiate."""
    out, wrt = dict(inputs), []

    def leaf(t):
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        t.requires_grad_(True)
        wrt.append(t)
        return t

    for name in ("q", "k", "v"):
        out[name] = leaf(inputs[name])
    if "kv_registers" in inputs:
        out["kv_registers"] = tuple(leaf(t) for t in inputs["kv_registers"])
    if "sinks" in inputs:
        out["sinks"] = leaf(inputs["sinks"])
    return out, wrt


def run_reference(case: Case, inputs: dict, dout: torch.Tensor, compute_dtype: torch.dtype):
    """Reference (float64) or eager-at-dtype results and gradients."""
    kw, wrt = leaves(inputs, torch.float64 if compute_dtype == torch.float64 else None)
    causal_offset = case.Nk - case.Nq if case.causal else None
    out, stats = attention_ref(
        **kw, causal_offset=causal_offset, num_prefix_tokens=case.prefix, compute_dtype=compute_dtype
    )
    grads = torch.autograd.grad(out, wrt, dout.to(out.dtype))
    return out, stats, grads


def check_case(case: Case, backend: str, device: str = "cpu", seed: int = 0) -> None:
    inputs = make_inputs(case, device, seed)
    dout = torch.randn(case.B, case.H, case.Nq, case.value_dim, device=device).to(case.dtype)

    kw, wrt = leaves(inputs, None)
    out, stats = attention(**kw, causal=case.causal, num_prefix_tokens=case.prefix, return_stats=True, backend=backend)
    assert out.dtype == case.dtype and out.shape == (case.B, case.H, case.Nq, case.value_dim)
    assert all(s.dtype == torch.float32 and not s.requires_grad for s in stats)
    grads = torch.autograd.grad(out, wrt, dout)

    cpu = {
        k: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu() if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }
    ref_out, ref_stats, ref_grads = run_reference(case, cpu, dout.cpu(), torch.float64)
    eager_out, eager_stats, eager_grads = run_reference(case, cpu, dout.cpu(), case.dtype)

    # the longest reduction of the forward and backward (dk, dv of grouped heads: G x Nq)
    K = max(case.Nq * case.H // case.kv_heads, case.R + case.Nk, case.D, case.value_dim)
    assert_within_eager_error("out", out, ref_out, eager_out, case.dtype, reduction=K)
    for name, got, ref, eager in zip(AttentionStats._fields, stats, ref_stats, eager_stats, strict=True):
        assert_within_eager_error(name, got, ref, eager, case.dtype, reduction=K)
    for name, got, ref, eager in zip(differentiable(inputs), grads, ref_grads, eager_grads, strict=True):
        assert got.shape == ref.shape and got.dtype == wrt[differentiable(inputs).index(name)].dtype
        assert_within_eager_error(f"d{name}", got, ref, eager, case.dtype, reduction=K)


requires_interpreter = pytest.mark.skipif(
    not triton_interpreting(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (unset because a GPU is present: "
    "the gpu-marked tests run these cases on CUDA)",
)


requires_cpu_kernel = pytest.mark.skipif(
    dsr_kernels.explain("attention", "cpu")["cpu"] != "available",
    reason="backend 'cpu': " + dsr_kernels.explain("attention", "cpu")["cpu"],
)
CPU = pytest.param("cpu", marks=requires_cpu_kernel)


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    check_case(case, "triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_reference(case):
    check_case(case, "torch")


@requires_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_backend_matches_reference(case):
    check_case(case, "cpu")


# Head dims the C++ kernel takes that the Triton kernels do not (its blocks start at 16):
# 1 (every row op is a tail), 3 and 17 (odd), with registers, sinks and masks.
CPU_ONLY_CASES = [
    Case(B=2, Nq=37, Nk=41, D=1, R=1, sinks=True, key_mask=True),
    Case(Nq=29, Nk=29, D=3, R=36, causal=True, dtype=torch.bfloat16),
    Case(Nq=50, Nk=33, D=17, R=4, per_sample_registers=True, attn_mask="float", prefix=2, dtype=torch.float16),
]


@requires_cpu_kernel
@pytest.mark.parametrize("case", CPU_ONLY_CASES, ids=str)
def test_cpu_backend_matches_reference_at_small_odd_head_dims(case):
    check_case(case, "cpu")


@pytest.mark.parametrize("backend", [CPU, "torch", pytest.param("triton", marks=requires_interpreter)])
@pytest.mark.parametrize("case", VALUE_DIM_CASES, ids=str)
def test_value_head_dim_differs_from_key_head_dim(case, backend):
    check_case(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("case", VALUE_DIM_CASES, ids=str)
def test_value_head_dim_triton_cuda(case):
    check_case(case, "triton", device="cuda")


@requires_cpu_kernel
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=3, Nq=257, Nk=292, D=72, R=36, sinks=True, key_mask=True, prefix=2),
        Case(B=2, H=4, Hk=2, Nq=129, Nk=77, D=40, Dv=24, R=4, sinks=True),  # grouped heads add into one dk
        Case(B=2, H=4, Hk=2, Nq=97, Nk=97, D=40, R=2, causal=True, rope="half", prefix=3),  # rotated in the kernel
    ],
    ids=str,
)
def test_cpu_backend_is_bitwise_the_same_for_any_thread_count(direction, case):
    inputs = make_inputs(case)
    dout = torch.randn(case.B, case.H, case.Nq, case.value_dim)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            kw, wrt = leaves(inputs, None)
            out, stats = attention(**kw, num_prefix_tokens=case.prefix, return_stats=True, backend="cpu")
            results.append([out, *stats] if direction == "fwd" else list(torch.autograd.grad(out, wrt, dout)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@requires_cpu_kernel
@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda a: a.__setitem__("q", a["q"].double()), "q must be float32"),
        (lambda a: a.__setitem__("k", a["k"][:, :, :, :8]), "k must be [B, Hk, Nk, D] with Hk dividing H"),
        (lambda a: a.__setitem__("v", a["v"][:, :, :5]), "v must be [B, Hk, Nk, Dv] matching k"),
        (lambda a: a.update(rk=torch.randn(3, 4, 16), rv=torch.randn(3, 4, 16)), "rk must be [H, R, D] or [B, H"),
        (lambda a: a.__setitem__("key_mask", torch.ones(2, 3, dtype=torch.bool)), "key_mask must be a bool"),
        (lambda a: a.__setitem__("out", torch.empty(2, 2, 9, 17)), "out must be [B, H, Nq, Dv]"),
        (lambda a: a.__setitem__("num_prefix_tokens", 99), "num_prefix_tokens must be in"),
        # rows BLAS would reject as a leading dimension: an error, not oneMKL's message and stale buffers
        (lambda a: a.__setitem__("q", torch.randn(2, 2, 1, 16).expand(2, 2, 9, 16)), "rows that do not overlap"),
        (lambda a: a.__setitem__("k", torch.randn(2, 2, 24).unfold(-1, 16, 1)), "rows that do not overlap"),
    ],
)
def test_cpu_kernel_direct_calls_check_their_arguments(mutate, words):
    """torch.ops.dsr_kernels.attention_fwd_cpu called directly: errors, never a crash."""
    B, H, N, D, R = 2, 2, 9, 16, 3
    a = dict(
        q=torch.randn(B, H, N, D),
        k=torch.randn(B, H, N, D),
        v=torch.randn(B, H, N, D),
        rk=torch.randn(H, R, D),
        rv=torch.randn(H, R, D),
        key_mask=torch.ones(B, N, dtype=torch.bool),
        num_prefix_tokens=0,
        out=torch.empty(B, H, N, D),
    )
    mutate(a)
    lse, stats = torch.empty(B, H, N), [torch.empty(B, H, N), torch.empty(B, H, N), torch.empty(B, H, R + N)]
    with pytest.raises(RuntimeError, match=re.escape(words)):
        call = AttentionCall(
            q=a["q"],
            k=a["k"],
            v=a["v"],
            rk=a["rk"],
            rv=a["rv"],
            key_mask=a["key_mask"],
            num_prefix_tokens=a["num_prefix_tokens"],
            scale=0.25,
            return_stats=True,
        )
        torch.ops.dsr_kernels.attention_fwd_cpu(*call.as_args(), a["out"], lse, *stats)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_cuda_matches_reference(case):
    check_case(case, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_auto_and_torch(backend):
    check_case(Case(B=2, Nq=292, Nk=292, D=72, R=36, sinks=True, dtype=torch.bfloat16), backend, device="cuda")


def test_torch_backend_chunks_match_single_chunk(monkeypatch):
    """The chunked path gives the same answer whatever the chunk size."""
    case = Case(B=2, Nq=113, Nk=257, D=72, R=36, sinks=True, key_mask=True, causal=True, prefix=4)
    inputs = make_inputs(case)
    full, stats_full = attention(**inputs, causal=True, num_prefix_tokens=4, return_stats=True, backend="torch")
    from dsr_kernels.torch import attention as torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 2 * 2 * 7 * (36 + 257))  # 7-row chunks
    small, stats_small = attention(**inputs, causal=True, num_prefix_tokens=4, return_stats=True, backend="torch")
    # Only the float32 summation order differs: a few ulps.
    eps = torch.finfo(torch.float32).eps
    assert_close("out", small, full, atol=8 * eps, rtol=8 * eps)
    for name, a, b in zip(AttentionStats._fields, stats_small, stats_full, strict=True):
        assert_close(name, a, b, atol=8 * eps, rtol=8 * eps)


# ----------------------------------------------------------------------------- properties


@requires_interpreter
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Nq=st.integers(1, 80),
    Nk=st.integers(1, 80),
    D=st.sampled_from([16, 24, 40, 64, 72, 80]),
    R=st.sampled_from([0, 1, 4, 17]),
    per_sample=st.booleans(),
    sinks=st.booleans(),
    key_mask=st.booleans(),
    causal=st.booleans(),
    attn_mask=st.sampled_from([None, "bool", "float"]),
    prefix_frac=st.floats(0, 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_triton_random_shapes_and_options(
    B, H, Nq, Nk, D, R, per_sample, sinks, key_mask, causal, attn_mask, prefix_frac, dtype
):
    case = Case(
        B=B,
        H=H,
        Nq=Nq,
        Nk=Nk,
        D=D,
        R=R,
        per_sample_registers=per_sample,
        sinks=sinks,
        key_mask=key_mask,
        causal=causal,
        attn_mask=attn_mask,
        prefix=int(prefix_frac * Nk),
        dtype=dtype,
    )
    check_case(case, "triton")


@pytest.mark.parametrize("backend", ["torch", CPU, "reference", pytest.param("triton", marks=requires_interpreter)])
def test_probability_is_conserved(backend):
    """sum_j key_mass + sum_i p_sink = number of queries that can attend anything."""
    case = Case(B=2, H=2, Nq=40, Nk=57, D=72, R=4, sinks=True, key_mask=True)
    inputs = make_inputs(case)
    _, stats = attention(**inputs, return_stats=True, backend=backend)
    p_sink = torch.exp(inputs["sinks"][None, :, None] - stats.lse)
    total = stats.key_mass.sum(-1) + p_sink.sum(-1)
    assert_close("total probability", total, torch.full_like(total, case.Nq), atol=1e-4)
    assert torch.all(stats.register_share <= 1 + 1e-6) and torch.all(stats.entropy >= -1e-6)
    assert torch.all(stats.entropy <= math.log(case.R + case.Nk + 1) + 1e-5)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", ["torch", CPU, "reference", pytest.param("triton", marks=requires_interpreter)])
def test_query_with_nothing_to_attend(backend):
    """No attendable key, no register, no sink: out 0, lse -inf, never NaN (grads too)."""
    q, k, v = (torch.randn(2, 2, 9, 24, requires_grad=True) for _ in range(3))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1] = False
    out, stats = attention(q, k, v, key_mask=key_mask, return_stats=True, backend=backend)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(stats.lse[1]))
    assert torch.isfinite(stats.lse[0]).all() and not torch.isnan(out).any()
    assert torch.all(stats.entropy[1] == 0) and torch.all(stats.key_mass[1] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", CPU, pytest.param("triton", marks=requires_interpreter)])
def test_nan_in_one_query_row_stays_in_that_row(backend):
    q, k, v = (torch.randn(1, 2, 70, 72) for _ in range(3))
    q[0, 1, 33, 5] = float("nan")
    rk = torch.randn(2, 3, 72)
    out = attention(q, k, v, kv_registers=(rk, rk), backend=backend)
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros_like(nan_rows)
    expected[0, 1, 33] = True
    assert torch.equal(nan_rows, expected)


@pytest.mark.parametrize("backend", ["torch", CPU, pytest.param("triton", marks=requires_interpreter)])
def test_packed_qkv_views_are_read_in_place(backend):
    """q/k/v as strided views of one [B, N, 3, H, D] projection output, no copy made."""
    B, N, H, D = 2, 37, 3, 80
    qkv = torch.randn(B, N, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = attention(q, k, v, backend=backend)
    expected = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    assert_close("out", out, expected, atol=1e-6)
    # out is written in [B, N, H, D] memory order: reshaping for the projection is free.
    assert out.transpose(1, 2).is_contiguous()


@requires_interpreter
def test_triton_path_builds_no_concatenated_tensor():
    """The Triton forward and backward launch kernels only: no torch.cat, no copies of inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsr_kernels.triton.attention import attention_bwd_triton, attention_fwd_triton

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    case = Case(Nq=40, Nk=57, D=72, R=36, sinks=True)
    x = make_inputs(case)
    rk, rv = x["kv_registers"]
    call = AttentionCall(q=x["q"], k=x["k"], v=x["v"], rk=rk, rv=rv, sinks=x["sinks"], scale=0.1, return_stats=True)
    outs = attention_ops.alloc_outputs(call)

    def forbidden(ops):  # (the interpreter itself moves data with new_empty / set_)
        return [op for op in ops if any(w in op for w in ("cat", "clone", "contiguous", "_to_copy", "stack"))]

    with Record() as rec:
        attention_fwd_triton(call, outs)
    assert rec.ops and not forbidden(rec.ops), forbidden(rec.ops)
    grads = attention_ops.alloc_grads(call)
    with Record() as rec:
        attention_bwd_triton(call, torch.randn_like(outs.out), outs.out, outs.lse, grads)
    assert rec.ops and not forbidden(rec.ops), forbidden(rec.ops)


@pytest.mark.parametrize("backend", ["torch", CPU, pytest.param("triton", marks=requires_interpreter)])
def test_registers_equal_concatenated_keys(backend):
    """kv_registers behave exactly like R keys/values concatenated in front of k/v."""
    B, H, N, D, R = 2, 2, 31, 64, 5
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    rk, rv = torch.randn(H, R, D), torch.randn(H, R, D)
    out, stats = attention(q, k, v, kv_registers=(rk, rv), return_stats=True, backend=backend)
    k_cat = torch.cat([rk.expand(B, -1, -1, -1), k], dim=2)
    v_cat = torch.cat([rv.expand(B, -1, -1, -1), v], dim=2)
    out_cat, stats_cat = attention(q, k_cat, v_cat, num_prefix_tokens=R, return_stats=True, backend=backend)
    assert_close("out", out, out_cat, atol=2e-6)
    for name, a, b in zip(AttentionStats._fields, stats, stats_cat, strict=True):
        assert_close(name, a, b, atol=2e-5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k_cat, v_cat)
    assert_close("out vs torch sdpa", out, expected, atol=2e-6)


# ----------------------------------------------------------------------------- autograd


def test_reference_gradcheck_float64():
    B, H, Nq, Nk, D, R = 1, 2, 5, 6, 8, 3
    args = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), (H, R, D), (H, R, D), (H,))
    ]
    key_mask = torch.tensor([[True, False, True, True, False, True]])

    def f(q, k, v, rk, rv, sinks):
        return attention_ref(q, k, v, kv_registers=(rk, rv), sinks=sinks, key_mask=key_mask, causal_offset=1)[0]

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("path", ["chunked", "cpu_flash"])
def test_torch_backend_gradcheck_float64(path):
    """The torch backend's hand-written backwards, checked numerically in float64.

    "chunked" (causal + additive mask) recomputes probabilities chunk by chunk;
    "cpu_flash" (key_mask only) merges two calls of PyTorch's CPU flash kernel.
    """
    from dsr_kernels.torch.attention import _uses_cpu_flash

    B, H, Nq, Nk, D, R = 2, 2, 5, 6, 8, 3
    args = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), (H, R, D), (H, R, D), (H,))
    ]
    if path == "chunked":
        options = dict(attn_mask=torch.randn(1, H, Nq, Nk, dtype=torch.float64), causal=True)
    else:
        options = dict(key_mask=torch.tensor([[True, False, True, True, False, True]] * B))
    causal = Causal.BOTTOM_RIGHT if options.get("causal") else Causal.NONE
    call = AttentionCall(q=args[0], k=args[1], v=args[2], attn_mask=options.get("attn_mask"), causal=int(causal))
    assert _uses_cpu_flash(call) == (path == "cpu_flash")

    def f(q, k, v, rk, rv, sinks):
        return attention(q, k, v, kv_registers=(rk, rv), sinks=sinks, backend="torch", **options)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_gradcheck_float64(style):
    """The transpose rotation of the rope backward, checked numerically (torch backend, float64)."""
    B, H, N, D = 1, 2, 6, 8
    args = [torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    rope = tuple(t.double() for t in rope_tables(N, D, style, identity_rows=2))

    def f(q, k, v):
        return attention(q, k, v, rope=rope, rope_style=style, causal=True, backend="torch")

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_shared_register_gradients_are_summed_over_batch(backend):
    B, H, N, D, R = 3, 2, 11, 16, 4
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    rk = torch.randn(H, R, D, requires_grad=True)
    rv = torch.randn(H, R, D, requires_grad=True)
    attention(q, k, v, kv_registers=(rk, rv), backend=backend).square().sum().backward()
    rk_b = rk.detach()[None].repeat(B, 1, 1, 1).requires_grad_()
    rv_b = rv.detach()[None].repeat(B, 1, 1, 1).requires_grad_()
    attention(q, k, v, kv_registers=(rk_b, rv_b), backend=backend).square().sum().backward()
    assert_close("drk", rk.grad, rk_b.grad.sum(0), atol=1e-5)
    assert_close("drv", rv.grad, rv_b.grad.sum(0), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", CPU, pytest.param("triton", marks=requires_interpreter)])
def test_opcheck(backend):
    q, k, v = (torch.randn(1, 2, 19, 24) for _ in range(3))
    rk, rv = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    sinks = torch.randn(2)
    key_mask = torch.rand(1, 19) > 0.2
    cos, sin = rope_tables(19, 24, "interleaved", identity_rows=2)
    for t in (q, k, v, rk, rv, sinks):
        t.requires_grad_(True)
    for cos_, sin_, style in ((None, None, 0), (cos, sin, 1)):
        call = AttentionCall(
            q=q,
            k=k,
            v=v,
            rk=rk,
            rv=rv,
            sinks=sinks,
            key_mask=key_mask,
            rope_cos=cos_,
            rope_sin=sin_,
            rope_style=style,
            causal=int(Causal.TOP_LEFT),
            num_prefix_tokens=2,
            scale=0.2,
            return_stats=True,
        )
        args = (*call.as_args(), backend)
        torch.library.opcheck(torch.ops.dsr_kernels.attention_fwd.default, args)
        out, lse = torch.ops.dsr_kernels.attention_fwd(*args)[:2]
        detached = call.replace(**{n: getattr(call, n).detach() for n in ("q", "k", "v", "rk", "rv", "sinks")})
        bwd_args = (torch.randn_like(out), out.detach(), lse.detach(), *detached.as_args(), backend)
        torch.library.opcheck(torch.ops.dsr_kernels.attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_torch_compile_fullgraph_module(backend):
    """A module calling attention compiles with fullgraph=True (no graph break) and matches eager."""
    torch._dynamo.reset()
    model = dsr_kernels.RegisterAttention(48, 4, num_kv_registers=3, sinks=True, backend=backend)
    x = torch.randn(2, 13, 48)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    assert_close("compiled out", out, model(x), atol=1e-5)
    out.sum().backward()
    assert model.register_k.grad is not None and model.sinks.grad is not None


# ----------------------------------------------------------------------------- validation


def _good():
    return dict(
        q=torch.randn(2, 3, 10, 16),
        k=torch.randn(2, 3, 12, 16),
        v=torch.randn(2, 3, 12, 16),
    )


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=torch.randn(3, 10, 16)), ValueError, ["'q'", "4-D", "[3, 10, 16]"]),
    ("k batch", lambda a: a.update(k=torch.randn(1, 3, 12, 16)), ValueError, ["'k'", "B=2", "[1, 3, 12, 16]"]),
    ("k heads", lambda a: a.update(k=torch.randn(2, 4, 12, 16)), ValueError, ["'k'", "H=3", "[2, 4, 12, 16]"]),
    ("k heads divide", lambda a: a.update(k=torch.randn(2, 2, 12, 16)), ValueError, ["'k'", "dividing H=3"]),
    (
        "value register dim",
        lambda a: a.update(v=torch.randn(2, 3, 12, 8), kv_registers=(torch.randn(3, 2, 16), torch.randn(3, 2, 16))),
        ValueError,
        ["'kv_registers[1]'", "Dv=8", "[3, 2, 16]"],
    ),
    ("k head dim", lambda a: a.update(k=torch.randn(2, 3, 12, 8)), ValueError, ["'k'", "D=16", "[2, 3, 12, 8]"]),
    (
        "v shape",
        lambda a: a.update(v=torch.randn(2, 3, 11, 16)),
        ValueError,
        ["'v'", "[B=2, Hk=3, Nk=12, Dv]", "[2, 3, 11, 16]"],
    ),
    ("k dtype", lambda a: a.update(k=a["k"].half()), TypeError, ["'k'", "torch.float32", "torch.float16"]),
    ("q dtype", lambda a: a.update(q=a["q"].int()), TypeError, ["'q'", "torch.int32"]),
    ("not a tensor", lambda a: a.update(v=[1.0]), TypeError, ["'v'", "list"]),
    (
        "D > 256",
        lambda a: a.update(q=torch.randn(1, 1, 4, 257), k=torch.randn(1, 1, 4, 257), v=torch.randn(1, 1, 4, 257)),
        ValueError,
        ["256", "D=257"],
    ),
    (
        "registers rank",
        lambda a: a.update(kv_registers=(torch.randn(4, 16), torch.randn(4, 16))),
        ValueError,
        ["kv_registers[0]", "[H=3, R, D=16]", "[4, 16]"],
    ),
    (
        "registers heads",
        lambda a: a.update(kv_registers=(torch.randn(2, 4, 16), torch.randn(2, 4, 16))),
        ValueError,
        ["kv_registers[0]", "H=3", "[2, 4, 16]"],
    ),
    (
        "registers batch",
        lambda a: a.update(kv_registers=(torch.randn(3, 3, 4, 16),) * 2),
        ValueError,
        ["kv_registers[0]", "B=2", "[3, 3, 4, 16]"],
    ),
    (
        "registers mismatch",
        lambda a: a.update(kv_registers=(torch.randn(3, 4, 16), torch.randn(3, 5, 16))),
        ValueError,
        ["kv_registers", "[3, 4, 16]", "[3, 5, 16]"],
    ),
    (
        "registers dtype",
        lambda a: a.update(kv_registers=(torch.randn(3, 4, 16).double(),) * 2),
        TypeError,
        ["kv_registers[0]", "torch.float64"],
    ),
    (
        "registers not a pair",
        lambda a: a.update(kv_registers=torch.randn(3, 4, 16)),
        TypeError,
        ["kv_registers", "pair"],
    ),
    ("sinks length", lambda a: a.update(sinks=torch.randn(4)), ValueError, ["'sinks'", "[H=3]", "[4]"]),
    ("sinks dtype", lambda a: a.update(sinks=torch.ones(3, dtype=torch.long)), TypeError, ["'sinks'", "torch.int64"]),
    (
        "key_mask shape",
        lambda a: a.update(key_mask=torch.ones(2, 10, dtype=torch.bool)),
        ValueError,
        ["'key_mask'", "[B=2, Nk=12]", "[2, 10]"],
    ),
    (
        "key_mask dtype",
        lambda a: a.update(key_mask=torch.ones(2, 12)),
        TypeError,
        ["'key_mask'", "bool", "torch.float32"],
    ),
    (
        "attn_mask shape",
        lambda a: a.update(attn_mask=torch.ones(2, 3, 10, 5, dtype=torch.bool)),
        ValueError,
        ["'attn_mask'", "Nk=12", "[2, 3, 10, 5]"],
    ),
    (
        "attn_mask dtype",
        lambda a: a.update(attn_mask=torch.ones(10, 12, dtype=torch.int32)),
        TypeError,
        ["'attn_mask'", "torch.int32"],
    ),
    ("prefix negative", lambda a: a.update(num_prefix_tokens=-1), ValueError, ["'num_prefix_tokens'", "Nk=12", "-1"]),
    ("prefix too large", lambda a: a.update(num_prefix_tokens=13), ValueError, ["'num_prefix_tokens'", "Nk=12", "13"]),
    ("scale nan", lambda a: a.update(scale=float("nan")), ValueError, ["'scale'", "nan"]),
    ("unknown backend", lambda a: a.update(backend="cudnn"), ValueError, ["'backend'", "'cudnn'"]),
    ("empty", lambda a: a.update(q=torch.randn(2, 3, 0, 16)), ValueError, ["empty"]),
    (
        "rope cross-attention",
        lambda a: a.update(rope=(torch.ones(10, 16), torch.zeros(10, 16))),
        ValueError,
        ["'rope'", "Nq=10, Nk=12"],
    ),
    (
        "rope table shape",
        lambda a: a.update(
            k=torch.randn(2, 3, 10, 16), v=torch.randn(2, 3, 10, 16), rope=(torch.ones(10, 8), torch.zeros(10, 8))
        ),
        ValueError,
        ["'rope[0]'", "[N=10, D=16]", "[10, 8]"],
    ),
    ("rope not a pair", lambda a: a.update(rope=torch.ones(10, 16)), TypeError, ["'rope'", "pair"]),
    ("rope style", lambda a: a.update(rope_style="neox"), ValueError, ["'rope_style'", "'neox'"]),
]


@pytest.mark.parametrize("mutate, exc, words", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_before_launch(monkeypatch, mutate, exc, words):
    def no_launch(*_):
        raise AssertionError("a kernel was launched before validation failed")

    monkeypatch.setattr(attention_ops, "launcher", no_launch)
    monkeypatch.setattr(attention_ops, "attention_call_ref", no_launch)
    args = _good()
    mutate(args)
    with pytest.raises(exc) as info:
        attention(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.gpu
def test_device_mismatch_raises():
    args = _good()
    args["k"] = args["k"].cuda()
    with pytest.raises(ValueError, match="'k' is on cuda"):
        attention(**args)


def test_device_mismatch_raises_on_meta():
    """Device mismatch, checked with the meta device so that it runs without a GPU."""
    args = _good()
    args["v"] = args["v"].to("meta")
    with pytest.raises(ValueError, match="'v' is on meta"):
        attention(**args)
    args = _good()
    args["sinks"] = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="'sinks' is on meta"):
        attention(**args)


def test_explicit_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        attention(**_good(), backend="triton")


def test_triton_rejects_float64():
    if not triton_interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    args = {k: v.double() for k, v in _good().items()}
    with pytest.raises(BackendUnavailable, match="float64"):
        attention(**args, backend="triton")


def test_auto_backend_on_cpu_is_the_cpu_kernel_when_built(monkeypatch):
    seen = []
    real = attention_ops.launcher
    monkeypatch.setattr(attention_ops, "launcher", lambda b, direction: seen.append(b) or real(b, direction))
    attention(**_good())
    built = dsr_kernels.explain("attention", "cpu")["cpu"] == "available"
    assert seen == ["cpu" if built else "torch"]
    assert dsr_kernels.explain("attention", "cpu")["torch"] == "available"
    attention(**{k: v.double() for k, v in _good().items()})  # float64: the cpu kernel takes fp32/fp16/bf16
    assert seen[-1] == "torch"


def test_attn_mask_requiring_grad_is_refused():
    args = _good()
    args["attn_mask"] = torch.zeros(10, 12, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        attention(**args)


def test_scale_and_defaults_match_sdpa():
    args = _good()
    out = attention(**args, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(args["q"], args["k"], args["v"], scale=0.3)
    assert_close("out", out, expected, atol=2e-6)
    out = attention(**args)
    expected = torch.nn.functional.scaled_dot_product_attention(args["q"], args["k"], args["v"])
    assert_close("out", out, expected, atol=2e-6)


# ----------------------------------------------------------------------------- layouts, NaN, memory
# The layouts and values that once gave silent wrong answers on the "cpu" path, each as its
# own test (tests/test_properties.py draws them all at random as well).

EVERY_BACKEND = ["torch", CPU, pytest.param("triton", marks=requires_interpreter)]


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    fn().backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_pooled_gradient_expanded_along_tokens(backend):
    """out.sum(dim=2): the incoming gradient is expanded along N (row stride 0)."""
    q, k, v = (torch.randn(2, 2, 33, 16, requires_grad=True) for _ in range(3))
    loss = lambda be: attention(q, k, v, backend=be).sum(dim=2).pow(2).sum()  # noqa: E731
    ref = _grads(lambda: loss("reference"), q, k, v)
    got = _grads(lambda: loss(backend), q, k, v)
    for name, g, r in zip("qkv", got, ref, strict=True):
        assert_close(f"d{name}", g, r, atol=2e-4)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("what", ["q expanded", "k unfolded", "registers expanded", "v offset by one"])
def test_overlapping_and_offset_rows(backend, what):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 33, 16, generator=g) for _ in range(3))
    rk, rv = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    if what == "q expanded":
        q = q[:, :, :1].expand(2, 2, 33, 16)
    elif what == "k unfolded":
        k = torch.randn(2, 2, 48, generator=g).unfold(-1, 16, 1)  # rows overlap: stride 1
    elif what == "registers expanded":
        rk, rv = rk.expand(2, 5, 16), rv.expand(2, 5, 16)
    else:
        v = torch.randn(v.numel() + 1, generator=g)[1:].view(v.shape)
    got = attention(q, k, v, kv_registers=(rk, rv), backend=backend)
    ref = attention(q, k, v, kv_registers=(rk, rv), backend="reference")
    assert_close("out", got, ref, atol=1e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_a_nan_key_reaches_every_row_in_any_vector_lane(backend):
    """A NaN logit is not a masked key, wherever its key sits (any lane of any vector width)."""
    for j in range(40):
        q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
        k[0, 0, j, 0] = float("nan")
        out, stats = attention(q, k, v, backend=backend, return_stats=True)
        assert out.isnan().all() and stats.lse.isnan().all() and stats.entropy.isnan().all(), f"key {j}"
        assert stats.key_mass.isnan().all(), f"key {j}"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize(
    "plant",
    [
        "register key", "float mask entry", "+inf key", "nan sink", "+inf sink", "masked nan key", "nan query row",
        "-inf sink, nothing to attend",
    ],
)  # fmt: skip
def test_nan_contract(backend, plant):
    """Each planted value against the reference: NaN where it is NaN, equal elsewhere, and the
    same gradients (docs/attention.md, "NaN and inf")."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 19, 8, generator=g) for _ in range(3))
    rk, rv = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    sinks, mask, key_mask = torch.randn(2, generator=g), None, None
    if plant == "register key":
        rk[1, 2, 0] = float("nan")
    elif plant == "float mask entry":
        mask = torch.zeros(19, 19)
        mask[4, 6] = float("nan")
    elif plant == "+inf key":
        k[0, 0, 5] = float("inf")  # logits +inf or -inf by the sign of q's entries
    elif plant in ("nan sink", "+inf sink"):
        sinks[0] = float("nan") if plant == "nan sink" else float("inf")
    elif plant == "masked nan key":
        k[0, 1, 7, 3] = float("nan")
        key_mask = torch.ones(1, 19, dtype=torch.bool)
        key_mask[0, 7] = False
    elif plant == "-inf sink, nothing to attend":  # head 0's rows attend nothing: lse -inf, out 0, dsinks 0
        sinks[0] = float("-inf")
        rk = rv = None  # (registers are always attended)
        key_mask = torch.ones(1, 19, dtype=torch.bool)
        key_mask[0, :] = False
    else:
        q[0, 1, 11, 2] = float("nan")
    wrt = [t.requires_grad_() for t in (q, k, v, rk, rv, sinks) if t is not None]
    dout = torch.randn(1, 2, 19, 8, generator=g)

    def run(be):
        out, stats = attention(
            q, k, v, kv_registers=None if rk is None else (rk, rv), sinks=sinks, attn_mask=mask, key_mask=key_mask,
            num_prefix_tokens=2, return_stats=True, backend=be,
        )  # fmt: skip
        grads = torch.autograd.grad(out, wrt, dout)
        return [out, *stats, *grads]

    names = ["out", *AttentionStats._fields, "dq", "dk", "dv", *(["drk", "drv"] if rk is not None else []), "dsinks"]
    for name, got, ref in zip(names, run(backend), run("reference"), strict=True):
        assert_close(name, got, ref, atol=1e-4)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_entropy_at_large_logits(backend):
    """The shifted entropy log l - sum p (s - m): within the rule at logits in the hundreds."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g) * 2 for _ in range(3))
    q = q * 4
    _, ref = attention(q.double(), k.double(), v.double(), return_stats=True, backend="reference")
    _, eager = attention_ref(q, k, v, compute_dtype=torch.float32)
    _, got = attention(q, k, v, return_stats=True, backend=backend)
    assert_within_eager_error("entropy", got.entropy, ref.entropy, eager.entropy, torch.float32, reduction=64)


@pytest.mark.parametrize("backend", ["reference", *EVERY_BACKEND])
def test_too_long_a_sequence_raises_before_allocating(backend):
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 2**31 + 8, 8)
    with pytest.raises(ValueError, match=re.escape("sequence lengths must be below 2**31")):
        attention(q, k, k, backend=backend, return_stats=True)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_strided_sinks(backend):
    q, k, v = (torch.randn(1, 3, 20, 16) for _ in range(3))
    sinks = torch.randn(6)[::2]
    assert_close("out", attention(q, k, v, sinks=sinks, backend=backend),
                 attention(q, k, v, sinks=sinks, backend="reference"), atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_half_inputs_at_large_magnitudes_keep_shares_in_range(backend):
    """fp16 at ~6e4 with registers and a sink: statistics as the reference's (a share in [0, 1])."""
    g = torch.Generator().manual_seed(4)
    q = ((torch.rand(1, 2, 8, 16, generator=g) * 2 - 1) * 6e4).half()  # finite in fp16 (at most 65504)
    k, v = (torch.randn(1, 2, 8, 16, generator=g) * 1e-2).half(), torch.randn(1, 2, 8, 16, generator=g).half()
    regs = ((torch.randn(2, 3, 16, generator=g) * 1e-2).half(), torch.randn(2, 3, 16, generator=g).half())
    sinks = torch.tensor([1.0, 2.0]).half()
    _, got = attention(q, k, v, kv_registers=regs, sinks=sinks, return_stats=True, backend=backend)
    _, ref = attention(q, k, v, kv_registers=regs, sinks=sinks, return_stats=True, backend="reference")
    assert torch.isfinite(ref.lse).all(), "the inputs must be finite for this test"
    assert ((got.register_share >= 0) & (got.register_share <= 1 + 1e-6)).all()
    for name in AttentionStats._fields:
        r = getattr(ref, name)
        assert_close(name, getattr(got, name), r, atol=2e-2 * max(1.0, float(r.abs().max())))


def _peak_rss_growth_mib(fn) -> float:
    from dsr_kernels.benchmark.common import peak_rss_mb

    measured = peak_rss_mb(fn)
    if measured is None:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident peak")
    return measured[1]


@requires_cpu_kernel
def test_cpu_statistics_memory_does_not_grow_as_n_squared():
    """Key mass with a fixed number of partial sums: at N = 24,000 the old per-block buffers
    took ceil(N / 16) x (R + N) floats (137 MiB); now a few rows of N floats."""
    q, k, v = (torch.randn(1, 1, 24_000, 4) for _ in range(3))
    attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], return_stats=True, backend="cpu")  # warm
    without = _peak_rss_growth_mib(lambda: attention(q, k, v, backend="cpu"))
    with_stats = _peak_rss_growth_mib(lambda: attention(q, k, v, return_stats=True, backend="cpu"))
    assert with_stats - without < 16, f"statistics took {with_stats - without:.1f} MiB more at N = 24,000"


@pytest.mark.parametrize("backend", ["torch", CPU])
def test_a_last_dim_of_one_takes_any_stride(backend):
    """Head dim 1 sliced from a wider tensor (last stride 2, as a step slice gives it), in the
    operands and in the incoming gradient: a size-1 dim's stride means nothing."""
    g = torch.Generator().manual_seed(5)
    wide = [torch.randn(1, 2, 5, 2, generator=g) for _ in range(4)]
    dout = wide[3][..., ::2]
    grads = {}
    for be in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in wide[:3]]
        views = [t[..., ::2] for t in leaves]
        assert views[0].stride(-1) == 2 and dout.stride(-1) == 2
        out = attention(*views, backend=be)
        grads[be] = (out, *torch.autograd.grad(out, leaves, dout))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), grads[backend], grads["reference"], strict=True):
        assert_close(name, got, ref, atol=1e-5)
