"""Compiles the package's Triton kernel launches for a real GPU (sm_90 by default), without a GPU.

The tests run the Triton kernels in Triton's CPU interpreter, which accepts programs the
GPU compiler rejects (and the other way round). This script drives the real launchers
with CPU tensors over the configurations they choose (dtypes, head-dim tilings, masks,
causal, RoPE, statistics on and off, norm kinds, test-time register variants), captures each launch instead of
running it, and compiles it ahead of time with Triton for each target, down to cubin
with ptxas. Run by CI; exits non-zero if any launch fails to compile.

    python tools/check_triton_compile.py [--arch 90] [--arch 80]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # must be off before triton is imported
# A fresh cache: every launch really compiles (and reports its shared memory).
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsr-triton-check-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

LAUNCH_OPTIONS = ("num_warps", "num_stages")


def capture_launches(fn) -> list[tuple[JITFunction, tuple, dict]]:
    """Runs fn() with every `kernel[grid](...)` recorded instead of launched."""
    captured = []
    original = JITFunction.__getitem__

    def fake_getitem(self, grid):
        return lambda *args, **kwargs: captured.append((self, args, kwargs))

    JITFunction.__getitem__ = fake_getitem
    try:
        fn()
    finally:
        JITFunction.__getitem__ = original
    return captured


# Shared memory one block may use (opt-in maximum): sm_80 163 KiB, sm_90 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict, arch: int) -> int:
    """Compiles one launch; returns its static shared memory in bytes."""
    names = kernel.arg_names
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for name in names:
        value = values[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = mangle_type(value)
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return compiled.metadata.shared


def attention_launches():
    from dsr_kernels.ops import attention as ops
    from dsr_kernels.rope import rope_1d_tables
    from dsr_kernels.triton.attention import attention_bwd_triton, attention_fwd_triton

    def run(
        dtype, D, *, R=4, sinks=True, key_mask=False, attn_mask=None, causal=None, rope=None, stats=True, Hk=2, Dv=None
    ):
        B, H, N, Dv = 1, 2, 40, Dv or D
        q = torch.randn(B, H, N, D, dtype=dtype)
        k, v = torch.randn(B, Hk, N, D, dtype=dtype), torch.randn(B, Hk, N, Dv, dtype=dtype)
        rk = torch.randn(H, R, D, dtype=dtype) if R else None
        rv = torch.randn(H, R, Dv, dtype=dtype) if R else None
        s = torch.randn(H) if sinks else None
        km = torch.rand(B, N) > 0.5 if key_mask else None
        am = None
        if attn_mask == "bool":
            am = (torch.rand(B, 1, N, N) > 0.5).expand(B, H, N, N)
        elif attn_mask == "float":
            am = torch.randn(1, H, N, N).expand(B, H, N, N)
        cos = sin = None
        kw = {}
        if rope:
            cos, sin = rope_1d_tables(N, D, style=rope)
            kw = dict(rope_cos=cos, rope_sin=sin, rope_style=rope)
        outs = ops._alloc_fwd(q, k, v, rk, stats)
        attention_fwd_triton(q, k, v, rk, rv, s, km, am, 2, 0.1, causal, stats, *outs, **kw)
        grads = ops._alloc_bwd(q, k, v, rk, rv, s)
        attention_bwd_triton(
            torch.randn_like(outs[0]), q, k, v, rk, rv, s, km, am, outs[0], outs[1], 0.1, causal, *grads, **kw
        )

    configs = [
        lambda: run(torch.bfloat16, 72),  # DSR DiT-XL: split head dim 64 + 16
        lambda: run(torch.bfloat16, 128),
        lambda: run(torch.float16, 64),
        lambda: run(torch.float32, 72),  # ieee dots
        lambda: run(torch.bfloat16, 80, R=0, sinks=False, key_mask=True, causal=0),
        lambda: run(torch.bfloat16, 72, attn_mask="bool", rope="interleaved"),
        lambda: run(torch.float16, 96, attn_mask="float", rope="half", stats=False),
        lambda: run(torch.bfloat16, 256, R=1, causal=3),
        lambda: run(torch.float32, 160, key_mask=True),
        lambda: run(torch.bfloat16, 16, R=0, sinks=False),
        lambda: run(torch.bfloat16, 72, Hk=1, key_mask=True),  # MQA: K/V head = query head // 2
        lambda: run(torch.bfloat16, 72, Dv=40),  # a value head dim of its own (72 = 64 + 16 for q, k; 40 for v)
        lambda: run(torch.float16, 64, Dv=160, causal=0),
        lambda: run_varlen(torch.bfloat16, 72, causal=True),
        lambda: run_varlen(torch.float16, 128, R=0, sinks=False, Hk=1),
    ]
    return configs


def run_varlen(dtype, D, *, R=4, sinks=True, causal=False, Hk=2):
    """Packed sequences (attention_varlen), forward with statistics and backward."""
    from dsr_kernels.ops import attention_varlen as ops
    from dsr_kernels.triton.attention import attention_varlen_bwd_triton, attention_varlen_fwd_triton

    H, lens = 2, [5, 0, 17]
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32)
    q = torch.randn(sum(lens), H, D, dtype=dtype)
    k, v = (torch.randn(sum(lens), Hk, D, dtype=dtype) for _ in range(2))
    rk = rv = torch.randn(H, R, D, dtype=dtype) if R else None
    s = torch.randn(H) if sinks else None
    outs = ops._alloc_fwd(q, v, rk, 3, 17, True)
    attention_varlen_fwd_triton(q, k, v, cu, cu, 17, 17, rk, rv, s, 0, 0.1, causal, True, *outs)
    grads = ops._alloc_bwd(q, k, v, rk, rv, s)
    attention_varlen_bwd_triton(
        torch.randn_like(outs[0]), q, k, v, cu, cu, 17, 17, rk, rv, s, outs[0], outs[1], 0.1, causal, *grads
    )


def norm_launches():
    from dsr_kernels.ops import norm_modulate as ops

    def run(dtype, D, *, kind="layernorm", R=36, shared=True, affine=False, modulate=True):
        B, N = 2, 10
        x = torch.randn(B, N, D, dtype=dtype)
        shift = scale = torch.randn(B, D, dtype=dtype) if modulate else None
        w = b = torch.randn(D, dtype=dtype) if affine else None
        regs = (torch.randn(R, D, dtype=dtype) if shared else torch.randn(B, R, D, dtype=dtype)) if R else None
        outs = ops._norm_modulate_fwd_triton(x, shift, scale, w, b, regs, kind, 1e-6, True, True)
        ops._norm_modulate_bwd_triton(
            torch.randn_like(outs[0]),
            torch.randn_like(outs[0]) if R else None,
            x,
            shift,
            scale,
            w,
            b,
            regs,
            outs[4],
            outs[5],
            kind,
        )

    return [
        lambda: run(torch.bfloat16, 1152),
        lambda: run(torch.float16, 1153, kind="rmsnorm", affine=True, shared=False),
        lambda: run(torch.float32, 72, R=0, modulate=False),
        lambda: run(torch.bfloat16, 8192, kind="rmsnorm", R=1),
    ]


def ttr_launches():
    from dsr_kernels.triton.ttr_activation import ttr_activation_triton

    def run(dtype, F, *, K=3, patch_values="zero", register_value="signed_max", tanh=False):
        h = torch.randn(2, 20, F, dtype=dtype)
        neurons = torch.randperm(F)[:K]
        ttr_activation_triton(
            h,
            neurons,
            torch.empty_like(h),
            num_registers=1,
            num_prefix_tokens=1,
            patch_values=patch_values,
            register_value=register_value,
            tanh=tanh,
        )

    return [
        lambda: run(torch.bfloat16, 3072),  # ViT-B's MLP
        lambda: run(torch.float16, 4304, patch_values="only_outliers", tanh=True),  # So400M's
        lambda: run(torch.float32, 72, patch_values="mean", register_value="layer_signed_max"),
        lambda: run(torch.bfloat16, 100, K=0, patch_values="same"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default: 90)")
    arches = parser.parse_args().arch or [90]

    launches = []
    for make in attention_launches() + norm_launches() + ttr_launches():
        launches += capture_launches(make)
    unique = {}
    for kernel, args, kwargs in launches:
        options = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        key = (kernel.fn.__name__, tuple(mangle_type(a) for a in args), options)
        unique.setdefault(key, (kernel, args, kwargs))
    failures = max_shared = 0
    start = time.time()
    for arch in arches:
        for (name, _, _), (kernel, args, kwargs) in unique.items():
            try:
                shared = compile_launch(kernel, args, kwargs, arch)
                if shared > SMEM_LIMIT.get(arch, 99 * 1024):
                    failures += 1
                    print(f"FAIL sm_{arch} {name} {kwargs}: needs {shared} B of shared memory")
                max_shared = max(max_shared, shared)
            except Exception as exc:
                failures += 1
                print(f"FAIL sm_{arch} {name} {kwargs}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(
        f"compiled {len(unique)} distinct launches for sm_{', sm_'.join(map(str, arches))} "
        f"in {time.time() - start:.0f} s (at most {max_shared // 1024} KiB of shared memory): {failures} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
