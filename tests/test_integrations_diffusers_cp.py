"""The "dsr" diffusers backend past one device: ``return_lse`` in diffusers' layout, and diffusers' own
context parallelism (``ContextParallelConfig(ring_degree=2)`` / ``(ulysses_degree=2)``) on 2 gloo CPU
processes, against the same model on one process.

diffusers 0.42.1's ``enable_parallelism`` cannot place a rank on a CPU-only torch (it computes
``rank % torch.accelerator.device_count()``, a division by 0 there); the processes here go through
``dsr_kernels.integrations.diffusers.enable_parallelism``, which builds the device mesh on "cpu" first
and is diffusers' call otherwise.
"""

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from utils import assert_close, spawn_world

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed (.ci/run installs it: pip install diffusers)", allow_module_level=True)

from diffusers.models import attention_dispatch  # noqa: E402

from dsr_kernels.integrations import diffusers as integration  # noqa: E402

TIMEOUT_S = 240  # per spawned test, both ranks (importing diffusers takes most of it on a loaded CPU)


def _reference(q, k, v, key_mask=None):
    """float64 attention on [B, S, H, D]: out [B, S, H, D] and lse [B, S, H] (natural log)."""
    q, k, v = (t.double().permute(0, 2, 1, 3) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ v
    return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)


def _qkv(B, S, H, D, *, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_backend_declares_context_parallel_and_return_lse_is_flash_layout():
    registry = attention_dispatch._AttentionBackendRegistry
    assert registry._is_context_parallel_available(attention_dispatch.AttentionBackendName("dsr"))
    q, k, v = _qkv(2, 37, 3, 24)
    key_mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.3
    for mask in (None, key_mask):
        out, lse = attention_dispatch.dispatch_attention_fn(
            q, k, v, attn_mask=mask, backend="dsr", attention_kwargs={"return_lse": True}
        )
        ref_out, ref_lse = _reference(q, k, v, mask)
        assert lse.shape == (2, 37, 3) and lse.dtype == torch.float32  # diffusers' [B, S, H], as its flash backends
        assert_close("out", out, ref_out, atol=2e-6)
        assert_close("lse (natural log)", lse, ref_lse, atol=2e-6)
        plain = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend="dsr")
        assert torch.equal(plain, out)


def test_return_lse_of_a_call_the_kernel_does_not_take_says_why():
    q, k, v = _qkv(1, 8, 2, 300)  # head dim above the kernels' 256
    with pytest.raises(ValueError, match="returns the lse only of calls"):
        attention_dispatch.dispatch_attention_fn(q, k, v, backend="dsr", attention_kwargs={"return_lse": True})


class _Ctx(SimpleNamespace):
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def test_ring_ops_merge_and_backward_on_one_process():
    """diffusers' ring on one process: the forward op on each K/V chunk, merged by lse as
    TemplatedRingAttention merges, and the backward op on each chunk with the merged out and lse,
    equal the whole attention (out, lse, dq, dk, dv)."""
    q, k, v = _qkv(2, 29, 2, 16, seed=3, requires_grad=True)
    dout = torch.randn(2, 29, 2, 16, generator=torch.Generator().manual_seed(4))
    chunks = [slice(0, 13), slice(13, 29)]  # unequal
    ctx, out, lse = _Ctx(), None, None
    with torch.no_grad():
        for i, c in enumerate(chunks):
            o, s = integration._cp_forward_op(ctx, q, k[:, c], v[:, c], return_lse=True, _save_ctx=i == 0)
            s = s.unsqueeze(-1)
            if out is None:
                out, lse = o.float(), s
            else:  # diffusers' merge, verbatim
                out = out - torch.sigmoid(s - lse) * (out - o)
                lse = lse - torch.nn.functional.logsigmoid(lse - s)
    lse = lse.squeeze(-1)
    ref_out, ref_lse = _reference(q, k, v)
    assert_close("ring out", out, ref_out, atol=3e-6)
    assert_close("ring lse", lse, ref_lse, atol=3e-6)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for c in chunks:
        gq, gk, gv = integration._cp_backward_op(ctx, dout, query=q, key=k[:, c], value=v[:, c], out=out, lse=lse)
        dq += gq
        dk[:, c], dv[:, c] = gk, gv
    ref = _reference(q, k, v)[0]
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(name, got, want, atol=1e-5)


# ----------------------------------------------------------------------------- 2 gloo processes


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # the same weights on every rank
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def _flux_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(16, 3),
        txt_ids=torch.zeros(6, 3),
        return_dict=False,  # diffusers' context-parallel hooks gather tensors, not output classes
    )


def _cp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import dsr_kernels

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        found = {}
        for kind in ("ring_degree", "ulysses_degree"):
            model = _flux()
            model.set_attention_backend("dsr")
            with torch.no_grad():
                single = model(**_flux_inputs())[0]
            integration.enable_parallelism(model, ContextParallelConfig(**{kind: world}))
            with torch.no_grad():
                parallel = model(**_flux_inputs())[0]
            found[f"{kind} model"] = (parallel, single)
            # The op itself, with gradients: this rank's shard of q, k, v through diffusers' ring / Ulysses.
            q, k, v = _qkv(2, 24, 4, 16, seed=5, requires_grad=True)
            dout = torch.randn(2, 24, 4, 16, generator=torch.Generator().manual_seed(6))
            rows = slice(rank * 12, rank * 12 + 12)
            shard = [t.detach()[:, rows].clone().requires_grad_() for t in (q, k, v)]
            out, lse = attention_dispatch.dispatch_attention_fn(
                *shard,
                backend="dsr",
                attention_kwargs={"return_lse": True},
                parallel_config=model._parallel_config,
            )
            out.backward(dout[:, rows])
            whole_out, whole_lse = _reference(q, k, v)
            whole_grads = torch.autograd.grad(whole_out, (q, k, v), dout.double())
            found[f"{kind} out"] = (out, whole_out[:, rows])
            found[f"{kind} lse"] = (lse, whole_lse[:, rows])
            for name, t, want in zip(("dq", "dk", "dv"), shard, whole_grads, strict=True):
                found[f"{kind} {name}"] = (t.grad, want[:, rows])
        # DSRAttnProcessor (dsr_kernels.patch) passes the parallel config on to the processor it wraps.
        model = _flux()
        dsr_kernels.patch(model)
        with torch.no_grad():
            single = model(**_flux_inputs())[0]
        integration.enable_parallelism(model, ContextParallelConfig(ring_degree=world))
        with torch.no_grad():
            found["patched ring model"] = (model(**_flux_inputs())[0], single)
        dsr_kernels.patch(model, num_kv_registers=2)
        try:
            with torch.no_grad():
                model(**_flux_inputs())
            found["registers under CP"] = "no error"
        except NotImplementedError as exc:
            found["registers under CP"] = str(exc)
        # Report through the manager, not by a collective (see tests/test_models.py's DDP test).
        results[rank] = {
            key: value if isinstance(value, str) else tuple(t.detach().double() for t in value)
            for key, value in found.items()
        }
    finally:
        dist.destroy_process_group()


def test_diffusers_context_parallel_ring_and_ulysses_two_processes(tmp_path):
    """Flux with the "dsr" backend under ContextParallelConfig(ring_degree=2) and (ulysses_degree=2) gives
    the single-process output on both ranks; the op's out, lse and gradients on each shard equal the whole
    attention's rows; a patched model's processors reach the ring too; registers under it say why not."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    results = mp.Manager().dict()
    spawn_world(_cp_worker, 2, (str(tmp_path / "init"), results), TIMEOUT_S)
    for rank in (0, 1):
        found = results[rank]
        note = found.pop("registers under CP")
        assert "kv registers, sinks and statistics are not supported" in note, note
        for name, (got, want) in found.items():
            assert_close(f"rank {rank}: {name}", got, want, atol=2e-5 if "model" in name else 1e-5)
