"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) on LightningDiT with diffusion
registers, one SGD step on 2 gloo CPU processes (each with half the batch) against the step on one
process with the whole batch: the same loss and the same updated parameters, registers included; and
FSDP2 with ring / Ulysses attention (``dsr_kernels.distributed``) over the same 2 processes, each with
half of the tokens, against one process on the whole sequence. One pair of processes runs both."""

import importlib.util

import pytest
import torch
from torch import nn

from dsr_kernels.models import create_model
from utils import assert_close, spawn_world

TIMEOUT_S = 180  # both ranks together
LR = 0.5
B = 4  # the whole batch; each of the 2 ranks takes B / 2 rows


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every process
    model = create_model(
        "LightningDiT-S/1", input_size=4, in_channels=16, depth=2, hidden_size=64, num_heads=4, num_classes=10,
        num_registers=4, register_start=1, class_dropout_prob=0.0,
    )  # fmt: skip
    with torch.no_grad():  # random weights everywhere (adaLN-Zero would make every block the identity)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch():
    """Flow matching's inputs drawn once (not inside the loss), so that every process sees the same rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, 4, 4, generator=g)
    eps = torch.randn(B, 16, 4, 4, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    y = torch.randint(0, 10, (B,), generator=g)
    return x, eps, t, y


def _loss(model: nn.Module, x, eps, t, y) -> torch.Tensor:
    """FlowMatching().loss's velocity error, with its noise and time given."""
    te = t[:, None, None, None]
    x_t = (1 - te) * x + te * eps
    v_pred = (x_t - model(x_t, t, y)) / te
    return (v_pred - (eps - x)).square().mean()


def _step(model: nn.Module, rows: slice) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = _loss(model, *(a[rows] for a in _batch()))
    loss.backward()
    opt.step()
    return loss.detach()


def _fsdp_step(rank: int, world: int, mesh) -> tuple:
    """FSDP2 over ``mesh``: each block and the root sharded, one step on this rank's half of the batch; the
    loss and this rank's shard (dim 0) of every parameter (the parent concatenates them)."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per = B // world
    loss = _step(model, slice(rank * per, rank * per + per))
    return loss, {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    """Both steps of this file on one pair of processes (starting them is most of the time)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        found = {"fsdp": _fsdp_step(rank, world, mesh)}
        if importlib.util.find_spec("dsr_kernels.distributed") is not None:
            found.update(_fsdp_cp_steps(rank, world, mesh))
        # Through the manager, not a collective (see tests/test_models.py's DDP test).
        results[rank] = found
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    """{rank: {"fsdp": (loss, shards), "ring_attention": ..., "ulysses_attention": ...}} of the 2 processes."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}")
    results = mp.Manager().dict()
    spawn_world(_worker, 2, (str(tmp_path_factory.mktemp("fsdp") / "init"), results), TIMEOUT_S)
    return dict(results)


def test_fsdp2_step_equals_single_process_step(spawned):
    single = _model()
    before = {n: p.detach().clone() for n, p in single.named_parameters()}
    loss = _step(single, slice(0, B))
    (loss0, shards0), (loss1, shards1) = spawned[0]["fsdp"], spawned[1]["fsdp"]
    assert_close("loss (mean of the ranks' half-batch losses)", (loss0 + loss1) / 2, loss, atol=1e-6, rtol=1e-6)
    for name, p in single.named_parameters():
        full = torch.cat([shards0[name], shards1[name]])
        assert_close(f"updated {name}", full, p, atol=1e-6, rtol=1e-5)
        if p.requires_grad:  # not the frozen position embeddings and time frequencies
            assert not torch.equal(p, before[name]), f"{name} did not change in the step"
    assert not torch.equal(single.register_tokens, before["register_tokens"]), "the registers did not learn"


# ----------------------------------------------------------------------------- FSDP2 with context parallelism


class _TokenBlock(nn.Module):
    """A tiny transformer block over video tokens [B, N, C] with learned kv registers and sinks, whose
    attention is ``dsr_kernels.attention`` on the whole sequence or a context-parallel one on this rank's
    shard of it (``attend``)."""

    def __init__(self, C: int = 32, H: int = 4, R: int = 3) -> None:
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.register_k = nn.Parameter(torch.randn(H, R, C // H) * 0.3)
        self.register_v = nn.Parameter(torch.randn(H, R, C // H) * 0.3)
        self.sinks = nn.Parameter(torch.randn(H) * 0.3)

    def forward(self, x, attend, register_grad_scale: float = 1.0):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, D]
        regs, sinks = (self.register_k, self.register_v), self.sinks
        if register_grad_scale != 1.0:  # the same values, their gradient scaled
            regs, sinks = (_grad_scaled(t, register_grad_scale) for t in regs), _grad_scaled(sinks, register_grad_scale)
        o = attend(q, k, v, kv_registers=tuple(regs), sinks=sinks)
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


def _grad_scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t * s + t.detach() * (1 - s)


def _cp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleList([_TokenBlock(), _TokenBlock()])


def _cp_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 24, 32, generator=g), torch.randn(2, 24, 32, generator=g)  # tokens, target


def _cp_step(model, x, target, attend, register_grad_scale=1.0) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for block in model:
        x = block(x, attend, register_grad_scale)
    loss = (x - target).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def _fsdp_cp_steps(rank: int, world: int, mesh) -> dict:
    """FSDP2 and ring / Ulysses attention over the same ranks: {scheme: (loss, this rank's shards)}."""
    import functools

    from torch.distributed.fsdp import fully_shard

    from dsr_kernels import distributed

    found = {}
    for scheme in ("ring_attention", "ulysses_attention"):
        model = _cp_model()
        for block in model:
            fully_shard(block, mesh=mesh)
        x, target = (distributed.shard_sequence(t, 1) for t in _cp_batch())  # this rank's tokens
        attend = functools.partial(getattr(distributed, scheme), group=mesh.get_group())
        # Each rank's loss is the mean over its tokens, and FSDP averages the gradients over the ranks: the
        # step of the mean over all tokens. But ring_attention / ulysses_attention return the register and
        # sink gradients already summed over the ranks (the whole sequence's, on every rank), so FSDP's
        # average would leave them G times too large: their gradient path is scaled by 1 / G. (Without it
        # the loss and every other parameter still match; the registers and sinks do not.)
        loss = _cp_step(model, x, target, attend, register_grad_scale=1.0 / world)
        found[scheme] = (loss, {n: p.to_local().detach().clone() for n, p in model.named_parameters()})
    return found


def test_fsdp2_with_context_parallel_step_equals_single_process_step(spawned):
    """FSDP2 and ring / Ulysses attention over the same 2 ranks, each holding half of the tokens of every
    sample: one step equals the step of one process on the whole sequence (loss and updated parameters)."""
    import dsr_kernels

    if "ring_attention" not in spawned[0]:
        pytest.skip("dsr_kernels.distributed (ring_attention, ulysses_attention) is not in this checkout")
    single = _cp_model()
    loss = _cp_step(single, *_cp_batch(), dsr_kernels.attention)
    for scheme in ("ring_attention", "ulysses_attention"):
        (loss0, shards0), (loss1, shards1) = spawned[0][scheme], spawned[1][scheme]
        assert_close(f"{scheme}: loss", (loss0 + loss1) / 2, loss, atol=1e-6, rtol=1e-6)
        for name, p in single.named_parameters():
            assert_close(
                f"{scheme}: updated {name}", torch.cat([shards0[name], shards1[name]]), p, atol=1e-6, rtol=1e-5
            )
