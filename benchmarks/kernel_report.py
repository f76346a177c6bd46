"""What every Triton launch of the package compiles to on a real GPU, without a GPU.

The tests run the Triton kernels in Triton's CPU interpreter, which accepts programs the
GPU compiler rejects and says nothing about registers or memory traffic. This script
drives the real launchers over the shapes that matter (DSR's DiT-XL at head dim 72, head
dims 64 / 80 / 128, video lengths, masks, RoPE, statistics and sinks on and off, packed
sequences, float32), captures each launch instead of running it, and compiles it ahead
of time exactly as Triton's JIT would on the GPU: the same binder, so the same
specialisation of the actual arguments (integers equal to 1 become constants, integers
and pointers divisible by 16 get the divisibility attribute), down to cubin with ptxas.
The tensors live on the ``meta`` device, so DSR's batch of 256 costs no memory; their
addresses are 0, aligned as a fresh allocation is.

For each launch it records, from the compiler's own output (ptxas -v and the PTX):
registers, spill stores / loads, shared memory, warps, stages, theoretical occupancy
(65,536 registers, 228 KiB of shared memory, 64 warps and 32 blocks per SM on sm_90),
and the counts of tensor-core instructions, cp.async and global loads by width. Next to
them a roofline model predicts each launch's time on an H200 from its FLOPs and bytes
(``predict``); ``--measure`` (run by benchmarks/gpu_check.sh on a GPU) times the same
launches and prints predicted against measured. Nothing in the report is a GPU time.

    python benchmarks/kernel_report.py [--arch 90] [--out benchmarks/results/kernels-sm90] [--check]
    python benchmarks/kernel_report.py --measure --out DIR      # on a GPU
    python benchmarks/kernel_report.py --check --out DIR --expect benchmarks/results/kernels-sm90  # CI

--check fails (exit 1) when a launch does not compile, a bf16/fp16 launch spills, a
launch needs more shared memory than the device has, an element-wise kernel
(norm_modulate, ttr_activation) has a theoretical occupancy under 50%, or, at head dim
72 or 80 (bf16/fp16, row-aligned inputs), an attention kernel's key/query loop has no
cp.async pipelining or it falls back to scalar 2-byte global loads: any at all without
RoPE and masks (the tile loads are then the only 2-byte loads), more than
SCALAR_2B_ALLOWANCE with them (a pair of boolean mask entries is a 2-byte load, and with
RoPE a narrow column block rotated once per program, at one element a thread, loads 2
bytes at a time; a tile loop that falls back makes dozens: 32 to 68 before the
interleaved partner moved into registers).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------- device limits

# sm_90 (H100 / H200): per SM.
SM_REGISTERS = 65536
SM_SMEM = 228 * 1024  # of which one block may use 227 KiB; 1 KiB per block is reserved
BLOCK_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
SM_WARPS = 64
SM_BLOCKS = 32
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)

# H200 ceilings the model predicts from (GPU.md: 769-798 TFLOP/s measured for a bf16
# matmul, ~4.3 TB/s device-to-device copy). Assumptions of the model, to be corrected
# by the first measured run: mma.sync (Ampere-style) tensor-core code reaches about 2/3
# of the wgmma peak on Hopper; float32 "ieee" dots run on the FP32 pipes (67 TFLOP/s).
H200 = {
    "sms": 132,
    "bf16_tflops": 790.0,
    "fp32_tflops": 67.0,
    "hbm_tb_per_s": 4.3,
    "mma_sync_fraction": 2 / 3,
}


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class AttentionCase:
    """One attention call (forward, and backward when ``backward``) at a given shape."""

    name: str
    dtype: str = "bfloat16"
    B: int = 2
    H: int = 2
    Hk: int | None = None
    N: int = 40
    R: int = 4
    D: int = 72
    Dv: int | None = None
    sinks: bool = False
    key_mask: bool = False
    attn_mask: str | None = None  # None | "bool" | "float"
    causal: int | None = None
    rope: str | None = None  # None | "interleaved" | "half"
    stats: bool = True
    backward: bool = True
    varlen: bool = False
    unaligned: bool = False  # q, k, v as column slices with row stride D + 1
    key_mass_in_backward: bool = False  # the key mass summed by the dK/dV kernel (no key-mass launch)
    target: bool = False  # a shape that matters (predicted, and measured by --measure)

    op = "attention"


@dataclass(frozen=True)
class NormCase:
    name: str
    dtype: str = "bfloat16"
    B: int = 2
    N: int = 10
    D: int = 1152
    R: int = 36
    kind: str = "layernorm"
    shared: bool = True
    affine: bool = False
    modulate: bool = True
    target: bool = False

    op = "norm_modulate"


@dataclass(frozen=True)
class TtrCase:
    name: str
    dtype: str = "bfloat16"
    B: int = 2
    T: int = 20
    F: int = 3072
    K: int = 3
    patch_values: str = "zero"
    register_value: str = "signed_max"
    tanh: bool = False
    target: bool = False

    op = "ttr_activation"


A = AttentionCase
DSR = dict(B=256, H=16, N=256, R=36, D=72, target=True)  # DiT-XL/2 at 256 px with DSR's 36 registers
CASES = [
    # The shapes that matter (target=True): predicted, and timed by --measure on a GPU.
    A("dsr-xl", **DSR),
    A("dsr-xl-nostats", **DSR, stats=False),
    A("dsr-xl-fp16", **{**DSR, "dtype": "float16"}),
    A("dsr-xl-sinks-keymask", **DSR, sinks=True, key_mask=True),
    A("dsr-xl-rope", **DSR, rope="half"),
    A("dsr-xl-boolmask", **DSR, attn_mask="bool", backward=False),
    A("dsr-xl-causal", **DSR, causal=0, backward=False),
    A("dsr-xl-R0", **{**DSR, "R": 0}),
    A("dit-b-d64", B=256, H=12, N=256, R=36, D=64, target=True),
    A("d80", B=64, H=16, N=1024, R=36, D=80, target=True),
    A("d80-rope-keymask", B=64, H=16, N=1024, R=36, D=80, rope="interleaved", key_mask=True),
    A("d128", B=32, H=16, N=1024, R=36, D=128, target=True),
    A("d128-fp16-gqa", dtype="float16", B=32, H=16, Hk=4, N=1024, R=36, D=128),
    A("video-16k-d72", B=1, H=16, N=16384, R=36, D=72, target=True),  # 16 x 32 x 32 latent grid
    A("video-wan-32760-d128", B=1, H=12, N=32760, R=36, D=128, target=True),  # 21 x 30 x 52 (Wan, 81 frames 480p)
    A("video-32760-d128-rope", B=1, H=12, N=32760, R=0, D=128, rope="half", backward=False),
    A("varlen-d72", B=3, H=16, N=256, R=36, D=72, varlen=True),
    A("varlen-d128-fp16", dtype="float16", B=3, H=16, Hk=4, N=256, R=0, D=128, varlen=True, causal=0),
    A("dsr-xl-fp32", **{**DSR, "dtype": "float32", "target": False}),
    A("d64-fp32", dtype="float32", B=8, H=12, N=256, R=36, D=64),
    A("d160-fp32-keymask", dtype="float32", B=2, H=4, N=256, R=4, D=160, key_mask=True),
    A("dsr-xl-unaligned", **{**DSR, "unaligned": True, "target": False}),
    # Coverage of the kernels' other constexpr branches at small, awkward shapes.
    A("small-d72-sinks", sinks=True),
    A("small-d128", D=128),
    A("small-d64-fp16", dtype="float16", D=64),
    A("small-d80-keymask-causal", D=80, R=0, key_mask=True, causal=0),
    A("small-d72-bool-interleaved", attn_mask="bool", rope="interleaved"),
    A("small-d96-fp16-float-half", dtype="float16", D=96, attn_mask="float", rope="half", stats=False),
    A("small-d256-causal3", D=256, R=1, causal=3),
    A("small-d16", D=16, R=0),
    A("small-d72-mqa-keymask", Hk=1, key_mask=True),
    A("small-d72-dv40", Dv=40),
    A("small-d64-fp16-dv160", dtype="float16", D=64, Dv=160, causal=0),
    # The key mass from the backward (training statistics): the dK/dV kernel's RETURN_KEY_MASS.
    A("dsr-xl-kmbwd", **{**DSR, "target": False}, key_mass_in_backward=True),
    A(
        "d80-rope-keymask-kmbwd",
        B=64,
        H=16,
        N=1024,
        R=36,
        D=80,
        rope="interleaved",
        key_mask=True,
        key_mass_in_backward=True,
    ),
    A("d128-fp16-gqa-kmbwd", dtype="float16", B=32, H=16, Hk=4, N=1024, R=36, D=128, key_mass_in_backward=True),
    A("small-d256-causal3-kmbwd", D=256, R=1, causal=3, key_mass_in_backward=True),
    A("varlen-d72-kmbwd", B=3, H=16, N=256, R=36, D=72, varlen=True, key_mass_in_backward=True),
    NormCase("dit-xl-layernorm", B=256, N=256, D=1152, R=36, target=True),
    NormCase("dit-xl-layernorm-fp32", dtype="float32", B=256, N=256, D=1152, R=36),
    NormCase("rmsnorm-affine-1153-fp16", dtype="float16", D=1153, kind="rmsnorm", affine=True, shared=False),
    NormCase("layernorm-72-fp32", dtype="float32", D=72, R=0, modulate=False),
    NormCase("rmsnorm-8192", D=8192, kind="rmsnorm", R=1),
    TtrCase("vit-b-mlp", B=64, T=197, F=3072, K=4, target=True),
    TtrCase("so400m-mlp", dtype="float16", B=64, T=257, F=4304, K=4, patch_values="only_outliers", tanh=True),
    TtrCase("ttr-mean-fp32", dtype="float32", F=3072, patch_values="mean", register_value="layer_signed_max"),
    TtrCase("ttr-same-K0", F=100, K=0, patch_values="same"),
]


# ----------------------------------------------------------------------------- running the launchers


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def run_attention(case: AttentionCase, device: str) -> None:
    """Runs the Triton launchers of one attention case (forward, then backward) on device."""
    import torch

    from dsr_kernels.attention_call import AttentionCall, Causal
    from dsr_kernels.ops.attention import alloc_grads, alloc_key_mass, alloc_outputs
    from dsr_kernels.rope import RopeStyle, rope_1d_tables
    from dsr_kernels.triton.attention import attention_bwd_triton, attention_fwd_triton

    dt = _dtype(case.dtype)
    kw = dict(dtype=dt, device=device)
    B, H, N, D, R = case.B, case.H, case.N, case.D, case.R
    Hk, Dv = case.Hk or H, case.Dv or D
    call = AttentionCall(
        q=torch.empty(0),  # (set below)
        k=torch.empty(0),
        v=torch.empty(0),
        rk=torch.randn(H, R, D, **kw) if R else None,
        rv=torch.randn(H, R, Dv, **kw) if R else None,
        sinks=torch.randn(H, device=device) if case.sinks else None,
        num_prefix_tokens=0,
        scale=D**-0.5,
        return_stats=case.stats,
        key_mass_in_backward=case.key_mass_in_backward,
    )
    if case.varlen:
        lens = [N - N // 3, N // 3 + 1, N] if B == 3 else [N] * B
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        T = sum(lens)
        call = call.replace(
            q=torch.randn(T, H, D, **kw),
            k=torch.randn(T, Hk, D, **kw),
            v=torch.randn(T, Hk, Dv, **kw),
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=max(lens),
            max_seqlen_k=max(lens),
            causal=int(Causal.BOTTOM_RIGHT if case.causal is not None else Causal.NONE),
        )
    else:

        def tokens(heads, dim, rows=N):
            if case.unaligned:  # column slices of wider rows: row stride dim + 1
                return torch.randn(B, heads, rows, dim + 1, **kw)[..., 1:]
            return torch.randn(B, heads, rows, dim, **kw)

        nq = N - (case.causal or 0)  # causal=c: c fewer queries than keys, bottom-right: offset c

        am = None
        if case.attn_mask == "bool":
            am = (torch.rand(B, 1, N, N, device=device) > 0.5).expand(B, H, N, N)
        elif case.attn_mask == "float":
            am = torch.randn(1, H, N, N, **kw).expand(B, H, N, N)
        call = call.replace(
            q=tokens(H, D, nq),
            k=tokens(Hk, D),
            v=tokens(Hk, Dv),
            key_mask=torch.rand(B, N, device=device) > 0.5 if case.key_mask else None,
            attn_mask=am,
            causal=int(Causal.BOTTOM_RIGHT if case.causal is not None else Causal.NONE),
        )
        if case.rope:
            cos, sin = rope_1d_tables(N, D, style=case.rope)
            call = call.replace(
                rope_cos=cos.to(device), rope_sin=sin.to(device), rope_style=int(RopeStyle.parse(case.rope))
            )
    outs = alloc_outputs(call)
    attention_fwd_triton(call, outs)
    if case.backward:
        grads = alloc_grads(call)
        present = grads._replace(
            drk=grads.drk if R else None, drv=grads.drv if R else None, dsinks=grads.dsinks if case.sinks else None
        )
        extra = {"key_mass": alloc_key_mass(call)} if case.key_mass_in_backward else {}
        attention_bwd_triton(call, torch.randn_like(outs.out), outs.out, outs.lse, present, **extra)


def run_norm(case: NormCase, device: str) -> None:
    import torch

    from dsr_kernels.ops import norm_modulate as ops

    kw = dict(dtype=_dtype(case.dtype), device=device)
    B, N, D, R = case.B, case.N, case.D, case.R
    x = torch.randn(B, N, D, **kw)
    shift = scale = torch.randn(B, D, **kw) if case.modulate else None
    w = b = torch.randn(D, **kw) if case.affine else None
    regs = (torch.randn(R, D, **kw) if case.shared else torch.randn(B, R, D, **kw)) if R else None
    # The custom ops' own bodies (on meta tensors the ops themselves would run their fakes).
    outs = ops._norm_modulate_fwd_triton._init_fn(x, shift, scale, w, b, regs, case.kind, 1e-6, True, True)
    dres = torch.randn_like(outs[0]) if R else None
    ops._norm_modulate_bwd_triton._init_fn(
        torch.randn_like(outs[0]), dres, x, shift, scale, w, b, regs, outs[4], outs[5], case.kind
    )


def run_ttr(case: TtrCase, device: str) -> None:
    import torch

    from dsr_kernels.triton.ttr_activation import ttr_activation_triton

    h = torch.randn(case.B, case.T, case.F, dtype=_dtype(case.dtype), device=device)
    neurons = torch.arange(case.K, device=device) * 7 % case.F
    ttr_activation_triton(
        h,
        neurons,
        torch.empty_like(h),
        num_registers=1,
        num_prefix_tokens=1,
        patch_values=case.patch_values,
        register_value=case.register_value,
        tanh=case.tanh,
    )


RUNNERS = {"attention": run_attention, "norm_modulate": run_norm, "ttr_activation": run_ttr}


@dataclass
class Launch:
    case: object
    kernel: object  # JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


def capture(case, device: str = "meta") -> list[Launch]:
    """Runs one case with every ``kernel[grid](...)`` recorded instead of launched."""
    from triton.runtime.jit import JITFunction

    captured: list[Launch] = []
    original = JITFunction.__getitem__

    def fake_getitem(self, grid):
        return lambda *args, **kwargs: captured.append(Launch(case, self, args, kwargs, tuple(grid)))

    JITFunction.__getitem__ = fake_getitem
    try:
        RUNNERS[case.op](case, device)
    finally:
        JITFunction.__getitem__ = original
    return captured


# ----------------------------------------------------------------------------- compiling as the JIT does


def specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
_WIDTH = re.compile(r"\.(?:b|u|s|f)(8|16|32|64|128)\b")


def ptx_counts(ptx: str) -> dict:
    """Static instruction counts in the PTX: tensor-core ops, cp.async, global loads by kind."""
    counts = {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk", ptx)),
        "ld_vector": 0,
        "ld_scalar_2b": 0,
        "ld_scalar_other": 0,
    }
    for match in _LD_GLOBAL.finditer(ptx):
        suffix = match.group(1)
        if ".v2" in suffix or ".v4" in suffix or ".v8" in suffix:
            counts["ld_vector"] += 1
            continue
        width = _WIDTH.findall(suffix)
        if width and width[-1] == "16":
            counts["ld_scalar_2b"] += 1
        else:
            counts["ld_scalar_other"] += 1
    return counts


def occupancy(regs: int, smem: int, warps: int) -> tuple[int, float]:
    """(blocks per SM, theoretical occupancy) on sm_90."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = SM_REGISTERS // (regs_per_warp * warps)
    by_smem = SM_SMEM // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by_regs, by_smem, SM_WARPS // warps, SM_BLOCKS)
    return blocks, blocks * warps / SM_WARPS


def compile_launch(launch: Launch, target, specialised: tuple) -> dict:
    """Compiles one launch for target from its ``specialise`` output; the resource row."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialised
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=target,
                options=options.__dict__,
            )
    finally:
        knobs.nvidia.dump_ptxas_log = False
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v report for {launch.kernel.fn.__name__}:\n{text[-2000:]}")
    md = compiled.metadata
    row = {
        "regs": int(regs.group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "smem": md.shared,
        "warps": md.num_warps,
        "stages": md.num_stages,
        **ptx_counts(compiled.asm["ptx"]),
    }
    row["blocks_per_sm"], row["occupancy"] = occupancy(row["regs"], row["smem"], row["warps"])
    row["aligned_args"] = sum(1 for v in attrs.values() if v)
    return row


# ----------------------------------------------------------------------------- the model


def _tensor_bytes(t) -> int:
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    # Elements actually addressed (a stride-0 view reads its storage once).
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def launch_work(launch: Launch) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one launch: every tensor argument moved once."""
    case, name = launch.case, launch.kernel.fn.__name__
    distinct = {id(a): a for a in launch.args}  # (absent inputs are passed as stand-ins: q again)
    nbytes = float(sum(_tensor_bytes(a) for a in distinct.values()))
    if case.op != "attention":
        return 0.0, nbytes
    Dv = case.Dv or case.D
    n_keys = case.N + case.R
    if case.varlen:
        lens = [case.N - case.N // 3, case.N // 3 + 1, case.N] if case.B == 3 else [case.N] * case.B
        pairs = sum(n * (n + case.R) for n in lens)
    else:
        pairs = case.B * case.N * n_keys
    if case.causal is not None:  # about half the token pairs, every register pair
        pairs = pairs - (pairs - case.B * case.N * case.R) / 2
    pairs *= case.H
    qk, pv = 2 * pairs * case.D, 2 * pairs * Dv
    flops = {
        "_attn_fwd_kernel": qk + pv,
        "_attn_key_mass_kernel": qk,
        "_attn_bwd_dkdv_kernel": 2 * qk + 2 * pv,  # s, dk; dv, dp
        "_attn_bwd_dq_kernel": 2 * qk + pv,  # s, dq; dp
    }.get(name, 0.0)
    return float(flops), nbytes


def predict(launch: Launch, row: dict, dtype: str) -> dict:
    """Roofline time of one launch on an H200, from its FLOPs, bytes and occupancy.

    compute: FLOPs at the tensor-core peak (wgmma), 2/3 of it for mma.sync, the FP32
    pipes for ieee float32 dots; memory: bytes at the HBM bandwidth, scaled down for the
    element-wise kernels (no tensor cores, no cp.async) when fewer than half the warp
    slots are resident (too little in flight to hide latency); both divided by the
    efficiency of the last wave (blocks that do not fill the SMs).
    """
    flops, nbytes = launch_work(launch)
    if dtype == "float32":
        peak = H200["fp32_tflops"]
    elif row.get("wgmma"):
        peak = H200["bf16_tflops"]
    else:
        peak = H200["bf16_tflops"] * H200["mma_sync_fraction"]
    bw = H200["hbm_tb_per_s"]
    if not (row.get("wgmma") or row.get("mma") or row.get("cp_async")):
        bw *= min(1.0, row["occupancy"] / 0.5)
    blocks = math.prod(launch.grid)
    per_wave = max(1, row["blocks_per_sm"]) * H200["sms"]
    waves = math.ceil(blocks / per_wave)
    wave_eff = blocks / (waves * per_wave) if waves else 1.0
    t_compute = flops / (peak * 1e12) if flops else 0.0
    t_memory = nbytes / (bw * 1e12) if bw else float("inf")
    t = max(t_compute, t_memory) / max(wave_eff, 1e-9)
    return {
        "gflop": flops / 1e9,
        "mbytes": nbytes / 1e6,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "waves": waves,
        "predicted_us": t * 1e6,
    }


# ----------------------------------------------------------------------------- report


@dataclass
class Row:
    case: str
    op: str
    kernel: str
    dtype: str
    detail: str
    target: bool
    grid: str
    block: str
    resources: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    error: str = ""


def _block(kwargs: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D0", "BLOCK_D1", "BLOCK_ROWS", "BLOCK_D", "BLOCK_R", "BLOCK_F", "BLOCK_T")
    return " ".join(f"{k.removeprefix('BLOCK_')}={kwargs[k]}" for k in keys if k in kwargs)


def _detail(case) -> str:
    if case.op == "attention":
        bits = [f"B={case.B} H={case.H} N={case.N} R={case.R} D={case.D}"]
        bits += [f"Hk={case.Hk}"] if case.Hk else []
        bits += [f"Dv={case.Dv}"] if case.Dv else []
        for flag in ("sinks", "key_mask", "varlen", "unaligned"):
            if getattr(case, flag):
                bits.append(flag)
        if case.attn_mask:
            bits.append(f"{case.attn_mask}-mask")
        if case.causal is not None:
            bits.append("causal")
        if case.rope:
            bits.append(f"rope-{case.rope}")
        bits.append("stats" if case.stats else "no-stats")
        return " ".join(bits)
    if case.op == "norm_modulate":
        return f"B={case.B} N={case.N} D={case.D} R={case.R} {case.kind}" + (" affine" if case.affine else "")
    return f"B={case.B} T={case.T} F={case.F} K={case.K} {case.patch_values}" + (" tanh" if case.tanh else "")


def build_report(arch: int, cases=CASES, names: set[str] | None = None) -> list[Row]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows, seen = [], {}
    for case in cases:
        if names and case.name not in names:
            continue
        for launch in capture(case):
            name = launch.kernel.fn.__name__
            row = Row(
                case.name,
                case.op,
                name,
                case.dtype,
                _detail(case),
                case.target,
                "x".join(map(str, launch.grid)),
                _block(launch.kwargs),
            )
            try:
                specialised = sig, constexprs, attrs, options = specialise(launch, backend)
                key = (
                    name,
                    repr(sorted(sig.items())),
                    repr(sorted(constexprs.items())),
                    repr(sorted(attrs.items())),
                    repr(sorted(options.__dict__.items())),
                )
                if key not in seen:
                    seen[key] = compile_launch(launch, target, specialised)
                row.resources = dict(seen[key])
                row.model = predict(launch, row.resources, case.dtype)
            except Exception as exc:  # reported, and --check fails on it
                row.error = f"{type(exc).__name__}: {str(exc)[:1500]}"
            rows.append(row)
    return rows


ATTENTION_TILE_KERNELS = {"_attn_fwd_kernel", "_attn_key_mass_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
SCALAR_2B_ALLOWANCE = 8  # with RoPE or masks (module docstring)


def failures(rows: list[Row], arch: int) -> list[str]:
    out = []
    for r in rows:
        where = f"{r.case} {r.kernel}"
        if r.error:
            out.append(f"{where}: does not compile: {r.error}")
            continue
        res = r.resources
        if r.dtype in ("bfloat16", "float16") and (res["spill_stores"] or res["spill_loads"]):
            out.append(f"{where}: {r.dtype} spills {res['spill_stores']} B stored / {res['spill_loads']} B loaded")
        if res["smem"] > BLOCK_SMEM_LIMIT.get(arch, 99 * 1024):
            out.append(f"{where}: needs {res['smem']} B of shared memory")
        case = next(c for c in CASES if c.name == r.case)
        tile_case = case.op == "attention" and case.D in (72, 80) and r.dtype in ("bfloat16", "float16")
        tile_case = tile_case and not case.unaligned
        # (a pair of 1-byte mask entries is a 2-byte load too; RoPE: see SCALAR_2B_ALLOWANCE)
        masked = tile_case and (case.rope or case.key_mask or case.attn_mask is not None)
        allowance = SCALAR_2B_ALLOWANCE if masked else 0
        if case.op != "attention" and res["occupancy"] < 0.5:
            out.append(f"{where}: theoretical occupancy {res['occupancy']:.1%} (under 50%)")
        if tile_case and r.kernel in ATTENTION_TILE_KERNELS | {"_attn_bwd_preprocess_kernel"}:
            if res["ld_scalar_2b"] > allowance:
                out.append(
                    f"{where}: {res['ld_scalar_2b']} scalar 2-byte global loads at D={case.D} (at most {allowance})"
                )
            if not res["ld_vector"] and not res["cp_async"]:
                out.append(f"{where}: no vector global loads at D={case.D}")
            if r.kernel in ATTENTION_TILE_KERNELS and not res["cp_async"]:
                out.append(f"{where}: no cp.async pipelining at D={case.D}")
    return out


COLUMNS = [
    ("case", "case"),
    ("kernel", "kernel"),
    ("dtype", "dtype"),
    ("block", "tile"),
    ("warps", "warps"),
    ("stages", "stages"),
    ("regs", "regs"),
    ("spill_stores", "spill st B"),
    ("spill_loads", "spill ld B"),
    ("smem", "smem KiB"),
    ("occupancy", "occupancy"),
    ("wgmma", "wgmma"),
    ("mma", "mma.sync"),
    ("cp_async", "cp.async"),
    ("ld_vector", "ld vec"),
    ("ld_scalar_2b", "ld 2B"),
    ("ld_scalar_other", "ld other"),
    ("predicted_us", "model us"),
    ("bound", "bound"),
]


def _flat(r: Row) -> dict:
    d = {k: v for k, v in asdict(r).items() if k not in ("resources", "model")}
    d.update(r.resources)
    d.update(r.model)
    return d


def _fmt(key: str, value) -> str:
    if value is None or value == "":
        return ""
    if key == "smem":
        return f"{value / 1024:.1f}"
    if key == "occupancy":
        return f"{value:.1%}"
    if key == "predicted_us":
        return f"{value:.1f}"
    return str(value)


def environment(arch: int) -> dict:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    return {
        "what": "ahead-of-time compilation (no GPU): registers, spills and shared memory from ptxas -v, "
        "instruction counts from the PTX, occupancy and times from a model",
        "arch": f"sm_{arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": getattr(ptxas, "version", ""),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": H200,
    }


def write_report(rows: list[Row], out: Path, arch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment(arch)
    flat = [_flat(r) for r in rows]
    (out / "report.json").write_text(json.dumps({"environment": env, "rows": flat}, indent=1) + "\n")
    keys = list(dict.fromkeys(k for d in flat for k in d))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    lines = [
        f"# Triton launches compiled for {env['arch']} as the JIT specialises them (no GPU)",
        "",
        f"Triton {env['triton']}, torch {env['torch']}, ptxas {env['ptxas']}, {env['date']}. "
        "Registers, spills and shared memory are ptxas's; instruction counts are static counts in "
        "the PTX; occupancy is theoretical (65,536 registers, 228 KiB, 64 warps per SM); "
        "`model us` is a roofline prediction for an H200 (benchmarks/kernel_report.py `predict`), "
        "not a measurement. Regenerate with `python benchmarks/kernel_report.py`.",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for d in flat:
        if d.get("error"):
            lines.append(f"| {d['case']} | {d['kernel']} | {d['dtype']} | ERROR {d['error'][:80]} |")
            continue
        lines.append("| " + " | ".join(_fmt(k, d.get(k)) for k, _ in COLUMNS) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- measuring on a GPU


def measure(out: Path, reference: Path) -> int:
    """Times every launch of the target cases on the GPU (torch.profiler, per kernel) and
    prints it against the committed report's prediction."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    predicted = {}
    if reference.exists():
        for d in json.loads(reference.read_text())["rows"]:
            predicted.setdefault((d["case"], d["kernel"]), []).append(d.get("predicted_us"))
    results = []
    for case in CASES:
        if not case.target:
            continue
        try:
            for _ in range(2):  # compile and warm up
                RUNNERS[case.op](case, "cuda")
            torch.cuda.synchronize()
            reps = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    RUNNERS[case.op](case, "cuda")
                torch.cuda.synchronize()
            times: dict[str, list[float]] = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    times.setdefault(ev.name, []).append(ev.device_time)
            for (cname, kernel), preds in predicted.items():
                if cname != case.name:
                    continue
                got = sorted(t for n, ts in times.items() if kernel in n for t in ts)
                if not got:
                    continue
                per_launch = got[len(got) // 2]
                pred = sum(p for p in preds if p is not None) / max(1, len(preds))
                results.append(
                    {
                        "case": case.name,
                        "kernel": kernel,
                        "predicted_us": pred,
                        "measured_us": per_launch,
                        "p20_us": got[len(got) // 5],
                        "p80_us": got[(4 * len(got)) // 5],
                        "measured_over_predicted": per_launch / pred if pred else None,
                    }
                )
        except Exception as exc:
            results.append({"case": case.name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "kernel_model.json").write_text(json.dumps({"environment": env, "rows": results}, indent=1) + "\n")
    print(f"\nkernel model vs measured ({env['device']}): per launch, median of the repetitions [p20, p80]")
    for r in results:
        if "error" in r:
            print(f"  {r['case']:<24} ERROR {r['error']}")
            continue
        ratio = r["measured_over_predicted"]
        print(
            f"  {r['case']:<24} {r['kernel']:<30} model {r['predicted_us']:9.1f} us  measured "
            f"{r['measured_us']:9.1f} us [{r['p20_us']:.1f}, {r['p80_us']:.1f}]  "
            f"{'' if ratio is None else f'{ratio:.2f}x the model'}"
        )
    return 1 if any("error" in r for r in results) else 0


def stale(new: Path, committed: Path, cases: set[str] | None = None) -> list[str]:
    """The rows of ``committed``/report.csv that this run (``new``) does not reproduce: a
    kernel change without its report regenerated. Compared only when the compilers are the
    committed report's (Triton and ptxas versions); otherwise says why not, and passes.
    ``cases``: only these (a run with --case)."""
    env = {k: json.loads((d / "report.json").read_text())["environment"] for k, d in (("new", new), ("old", committed))}
    versions = [k for k in ("triton", "ptxas") if env["new"].get(k) != env["old"].get(k)]
    if versions:
        said = ", ".join(f"{k} {env['old'].get(k)} -> {env['new'].get(k)}" for k in versions)
        print(f"--expect: not compared with {committed} (made with other compilers: {said})")
        return []
    if new.resolve() == committed.resolve():
        return []

    def rows(d: Path) -> dict[tuple[str, str], dict]:
        with open(d / "report.csv", newline="") as f:
            return {(r["case"], r["kernel"]): r for r in csv.DictReader(f)}

    got, want = rows(new), rows(committed)
    if cases is not None:
        want = {key: r for key, r in want.items() if key[0] in cases}
        got = {key: r for key, r in got.items() if key[0] in cases}
    out = [f"{c} {k}: in {committed}/report.csv, not made by this run" for c, k in want.keys() - got.keys()]
    out += [f"{c} {k}: made by this run, not in {committed}/report.csv" for c, k in got.keys() - want.keys()]
    for key in sorted(got.keys() & want.keys()):
        before, after = want[key], got[key]
        diff = [f"{col} {before[col]} -> {after.get(col)}" for col in before if before[col] != after.get(col)]
        if diff:
            out.append(f"{key[0]} {key[1]}: differs from {committed}/report.csv ({'; '.join(diff[:6])})")
    if out:
        out.append(f"regenerate it: python benchmarks/kernel_report.py --out {committed}")
    return sorted(out[:-1]) + out[-1:] if out else []


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.{md,csv,json}")
    parser.add_argument("--check", action="store_true", help="exit 1 on the failures listed above")
    parser.add_argument("--case", action="append", help="only these cases (by name)")
    parser.add_argument("--measure", action="store_true", help="time the target cases on a GPU against the model")
    parser.add_argument(
        "--expect",
        type=Path,
        default=None,
        help="a committed report folder: exit 1 when this run's rows differ from its report.csv "
        "(compared when the Triton and ptxas versions are the ones it was made with)",
    )
    args = parser.parse_args(argv)
    default_out = Path(__file__).parent / "results" / f"kernels-sm{args.arch}"
    if args.measure:
        return measure(args.out or Path("."), default_out / "report.json")

    start = time.time()
    rows = build_report(args.arch, names=set(args.case) if args.case else None)
    write_report(rows, args.out or default_out, args.arch)
    problems = failures(rows, args.arch)
    if args.expect is not None:
        problems += stale(args.out or default_out, args.expect, set(args.case) if args.case else None)
    for p in problems:
        print(f"FAIL {p}")
    worst_smem = max((r.resources.get("smem", 0) for r in rows), default=0)
    spilling = [r for r in rows if r.resources.get("spill_stores")]
    print(
        f"{len(rows)} launches of {len({r.case for r in rows})} cases compiled for sm_{args.arch} in "
        f"{time.time() - start:.0f} s; at most {worst_smem / 1024:.0f} KiB of shared memory; "
        f"{len(spilling)} launches spill ({', '.join(sorted({r.dtype for r in spilling})) or 'none'}); "
        f"{len(problems)} failures"
    )
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    if "--measure" not in sys.argv:
        os.environ.pop("TRITON_INTERPRET", None)  # must be off before triton is imported
        os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="dsr-kernel-report-"))
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch gets in Triton 3.9
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
