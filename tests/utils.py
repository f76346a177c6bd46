"""Assertion helpers shared by the tests.

Tolerances follow FlashAttention's rule: the error of a kernel against a float64
reference may be at most twice the error of the same computation done in eager PyTorch
at the kernel's dtype, plus a small absolute term of a few units in the last place of
that dtype at the scale of the result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fmt_index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def assert_close(name: str, got: Tensor, ref: Tensor, *, atol: float, rtol: float = 0.0) -> None:
    """allclose that says where and how often it fails, and treats NaN/inf exactly."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    nan_g, nan_r = torch.isnan(g), torch.isnan(r)
    assert torch.equal(nan_g, nan_r), (
        f"{name}: NaN where the reference has none at {int((nan_g & ~nan_r).sum())} places, "
        f"missing NaN at {int((nan_r & ~nan_g).sum())} places"
    )
    inf_g, inf_r = torch.isinf(g), torch.isinf(r)
    assert torch.equal(inf_g, inf_r) and torch.equal(g[inf_g], r[inf_r]), f"{name}: infinities differ"
    finite = ~(nan_r | inf_r)
    err = (g - r).abs().where(finite, 0.0)
    bound = atol + rtol * r.abs().where(finite, 0.0)
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = _fmt_index(worst, g.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.numel()} elements out of tolerance "
            f"(atol={atol:.3g}, rtol={rtol:.3g}); worst at {idx}: got {g.flatten()[worst]:.6g}, "
            f"reference {r.flatten()[worst]:.6g}, |err| {err.flatten()[worst]:.3g}"
        )


def max_abs_err(got: Tensor, ref: Tensor) -> float:
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(r) & torch.isfinite(g)
    if not finite.any():
        return 0.0
    return float((g - r).abs()[finite].max())


def ulp_atol(ref: Tensor, dtype: torch.dtype, ulps: float = 2.0, reduction: int = 16) -> float:
    """A few units in the last place of ``dtype``, plus the float32 accumulation floor.

    Both at the magnitude of ``ref`` (at least 1). The kernels accumulate in float32 in
    an order of their own (FlashAttention's delta = rowsum(dO * O) against dP = dO V^T,
    say), so where eager PyTorch happens to be nearly exact (a single key: dq = 0) they
    may still differ by float32 rounding, which grows like sqrt(K) over a reduction of
    length K: the floor is 2 sqrt(K) float32 ulps (8 ulps, 1e-6 at magnitude 1, for K <= 16).
    """
    r = ref.detach().double()
    r = r[torch.isfinite(r)]
    scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
    floor = 2.0 * max(reduction, 16) ** 0.5 * torch.finfo(torch.float32).eps
    return (ulps * torch.finfo(dtype).eps + floor) * scale


def assert_within_eager_error(
    name: str, got: Tensor, ref: Tensor, eager: Tensor, dtype: torch.dtype, *, reduction: int = 16
) -> None:
    """|got - ref| <= 2 |eager - ref|_max + a few ulps of dtype and the float32 floor, elementwise."""
    atol = 2.0 * max_abs_err(eager, ref) + ulp_atol(ref, dtype, reduction=reduction)
    assert_close(name, got, ref, atol=atol)


def spawn_world(fn, world: int, args: tuple, timeout_s: float) -> None:
    """Runs fn(rank, world, *args) on ``world`` spawned processes; fails (and ends them) past the timeout."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} processes did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
