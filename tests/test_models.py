"""Reference diffusion transformers: names, checkpoints' keys, FLOPs, fused vs eager, training."""

from __future__ import annotations

import math

import pytest
import torch

import dsr_kernels
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.diffusion import FlowMatching, GaussianDiffusion, sample_ddim, sample_euler
from dsr_kernels.models import create_model, flops, list_models
from utils import assert_within_eager_error

# Small configurations of every family (registers from block 1 or 2 so that blocks both
# before and after the insertion run).
SMALL = {
    "DiT": ("DiT-S/2", dict(input_size=8, depth=3, hidden_size=64, num_heads=4, num_classes=10)),
    "SiT": ("SiT-S/2", dict(input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10)),
    "LightningDiT": (
        "LightningDiT-S/1",
        dict(input_size=4, in_channels=16, depth=3, hidden_size=64, num_heads=4, num_classes=10),
    ),
    "DiTDH": (
        "DiTDH-S/1",
        dict(input_size=4, in_channels=16, depth=(3, 1), hidden_size=(64, 128), num_heads=(4, 4), num_classes=10),
    ),
    "JiT": (
        "JiT-B/16",
        dict(
            input_size=32,
            patch_size=8,
            depth=3,
            hidden_size=64,
            num_heads=4,
            bottleneck_dim=16,
            in_context_len=4,
            in_context_start=1,
            num_classes=10,
        ),
    ),
}


def small(family: str, **overrides):
    name, cfg = SMALL[family]
    return create_model(name, **{**cfg, **overrides})


def batch(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.rand(B, generator=g), torch.randint(0, 10, (B,), generator=g)


def perturb(model):
    """Random weights everywhere (the adaLN-Zero init would make every block the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


# ----------------------------------------------------------------------------- names, keys, FLOPs


def test_every_name_builds_on_meta():
    with torch.device("meta"):
        for name in list_models():
            model = create_model(name)
            assert sum(p.numel() for p in model.parameters()) > 0, name


def _dit_keys(depth: int) -> set[str]:
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    keys |= {f"final_layer.{m}.{w}" for m in ("linear", "adaLN_modulation.1") for w in ("weight", "bias")}
    for i in range(depth):
        keys |= {
            f"blocks.{i}.{m}.{w}"
            for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
            for w in ("weight", "bias")
        }
    return keys


def test_dit_xl2_matches_the_released_checkpoint_layout():
    """facebookresearch/DiT's DiT-XL/2: 292 tensors, 675,129,632 parameters (pos_embed included)."""
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    sd = model.state_dict()
    assert set(sd) == _dit_keys(28) and len(sd) == 292
    assert sum(t.numel() for t in sd.values()) == 675_129_632
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)  # learn_sigma: 2 x 4 channels x 2 x 2
    assert not model.pos_embed.requires_grad


def test_lightningdit_xl_with_registers_matches_the_dsr_layout():
    """DSR's stage-2 LightningDiT-XL/1 with 36 registers from block 8 (persistent RoPE buffers)."""
    with torch.device("meta"):
        model = create_model("LightningDiT-XL/1", num_registers=36)
    assert model.register_start == 8
    sd = model.state_dict()
    expected = {
        "x_embedder.proj.weight": (1152, 768, 1, 1),
        "t_embedder.W": (256,),
        "t_embedder.mlp.0.weight": (1152, 512),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "pos_embed": (1, 256, 1152),
        "register_tokens": (1, 36, 1152),
        "register_pos_embed": (1, 36, 1152),
        "feat_rope.freqs_cos": (256, 72),
        "feat_rope_incontext.freqs_sin": (292, 72),
        "blocks.0.norm1.weight": (1152,),
        "blocks.27.attn.qkv.bias": (3456,),
        "blocks.3.mlp.w12.weight": (6144, 1152),
        "blocks.3.mlp.w3.weight": (1152, 3072),
        "blocks.5.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.norm_final.weight": (1152,),
        "final_layer.linear.weight": (768, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("q_norm" in k or "k_norm" in k for k in sd)  # use_qknorm=False in DSR's configs
    assert len([k for k in sd if k.startswith("blocks.0.")]) == 12


def test_jit_b16_layout():
    with torch.device("meta"):
        model = create_model("JiT-B/16")
    sd = model.state_dict()
    expected = {
        "x_embedder.proj1.weight": (128, 3, 16, 16),
        "x_embedder.proj2.weight": (768, 128, 1, 1),
        "in_context_posemb": (1, 32, 768),
        "pos_embed": (1, 256, 768),
        "blocks.0.attn.q_norm.weight": (64,),
        "blocks.11.mlp.w12.weight": (4096, 768),
        "blocks.11.mlp.w3.weight": (768, 2048),
        "final_layer.linear.weight": (768, 768),
        "final_layer.adaLN_modulation.1.weight": (1536, 768),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "x_embedder.proj1.bias" not in sd and not any("rope" in k for k in sd)  # tables are not in JiT's files


def test_ditdh_xl_layout():
    with torch.device("meta"):
        model = create_model("DiTDH-XL/1", num_registers=36)
    sd = model.state_dict()
    assert tuple(sd["blocks.28.attn.qkv.weight"].shape) == (6144, 2048)
    assert tuple(sd["s_projector.weight"].shape) == (2048, 1152)
    assert tuple(sd["final_layer.adaLN_modulation.1.weight"].shape) == (4096, 2048)
    assert tuple(sd["dec_register_tokens"].shape) == (1, 36, 2048) and "enc_feat_rope_incontext.freqs_cos" in sd


PUBLISHED = [
    ("DiT-S/2", {}, "macs", 6.06),
    ("DiT-B/2", {}, "macs", 23.0),
    ("DiT-L/2", {}, "macs", 80.7),
    ("DiT-XL/2", {}, "macs", 118.6),
    ("LightningDiT-S/1", {}, "flops", 12.4),
    ("LightningDiT-B/1", {}, "flops", 46.6),
    ("LightningDiT-XL/1", {}, "flops", 238.1),
    ("LightningDiT-S/1", dict(num_registers=36), "flops", 13.7),
    ("LightningDiT-B/1", dict(num_registers=36), "flops", 51.2),
    ("LightningDiT-XL/1", dict(num_registers=36), "flops", 262.9),
]


@pytest.mark.parametrize("name, overrides, unit, giga", PUBLISHED)
def test_flops_reproduce_published_numbers(name, overrides, unit, giga):
    with torch.device("meta"):
        count = flops(create_model(name, **overrides))
    got = getattr(count, unit) / 1e9
    assert abs(got - giga) / giga < 0.005, f"{name}: {got:.3f} G{unit} vs published {giga}"
    assert count.flops == 2 * count.macs and sum(count.by_block.values()) == count.macs


def test_flops_scale_with_batch_and_registers():
    with torch.device("meta"):
        base, regs = create_model("DiT-S/2"), create_model("DiT-S/2", num_registers=16)
    assert flops(base, batch_size=4).macs == 4 * flops(base).macs
    assert flops(regs).macs > flops(base).macs
    assert regs.register_start == 4


# ----------------------------------------------------------------------------- fused vs reference


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("family", list(SMALL))
def test_fused_model_matches_eager_model(family, registers):
    """Fused ops (CPU: compiled norm kernels + torch attention) vs eager PyTorch, out and grads."""
    fused = perturb(small(family, num_registers=registers, register_start=1))
    check_against_eager(family, fused, registers)


def check_against_eager(family, fused, registers, backend_name="auto"):
    sd = fused.state_dict()
    ref64 = small(family, num_registers=registers, register_start=1, backend="eager").double()
    ref64.load_state_dict(sd)
    ref32 = small(family, num_registers=registers, register_start=1, backend="eager")
    ref32.load_state_dict(sd)
    x, t, y = batch(fused)
    for m in (fused, ref64, ref32):
        m.eval()
    outs = []
    for m, dtype in ((fused, torch.float32), (ref64, torch.float64), (ref32, torch.float32)):
        out = m(x.to(dtype), t.to(dtype), y)
        out.square().sum().backward()
        outs.append(out)
    assert_within_eager_error("out", outs[0], outs[1], outs[2], torch.float32)
    grads = [dict(m.named_parameters()) for m in (fused, ref64, ref32)]
    for name, p in grads[0].items():
        if p.requires_grad:
            assert_within_eager_error(f"d{name}", p.grad, grads[1][name].grad, grads[2][name].grad, torch.float32)


@pytest.mark.skipif(not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("family", ["LightningDiT", "JiT"])
def test_triton_model_matches_eager_model(family):
    """The whole model on the Triton kernels (in-kernel RoPE, prefix tokens), in the interpreter."""
    fused = perturb(small(family, num_registers=4, register_start=1, backend="triton"))
    check_against_eager(family, fused, 4)


def test_zero_registers_is_the_baseline_model():
    torch.manual_seed(0)
    a = small("DiT")
    torch.manual_seed(0)
    b = small("DiT", num_registers=0, register_start=2)
    assert a.state_dict().keys() == b.state_dict().keys()
    x, t, y = batch(a)
    assert torch.equal(a.eval()(x, t, y), b.eval()(x, t, y))
    with_regs = small("DiT", num_registers=4, register_start=1)
    assert set(with_regs.state_dict()) - set(a.state_dict()) == {"register_tokens", "register_pos_embed"}
    assert with_regs(x, t, y).shape == a(x, t, y).shape  # registers never reach the output


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "build, exc, words",
    [
        (lambda: small("DiT", num_registers=5), ValueError, ["perfect square", "5"]),
        (lambda: small("DiT", num_registers=4, register_start=3), ValueError, ["register_start", "depth=3", "3"]),
        (lambda: small("LightningDiT", num_registers=4, register_start=-1), ValueError, ["register_start"]),
        (lambda: create_model("DiT-XXL/2"), ValueError, ["unknown model name", "'DiT-XXL/2'", "DiT-XL/2"]),
        (lambda: create_model("DiT-S/2", num_layers=3), ValueError, ["num_layers"]),
    ],
)
def test_bad_configuration_raises(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_bad_latents_raise():
    model = small("LightningDiT")
    x, t, y = batch(model)
    with pytest.raises(ValueError, match=r"'x' must be \[B, C=16, 4, 4\], got \[2, 8, 4, 4\]"):
        model(x[:, :8], t, y)
    with pytest.raises(ValueError, match=r"'x' must be \[B, C=16, 4, 4\], got \[2, 16, 8, 8\]"):
        model(torch.randn(2, 16, 8, 8), t, y)
    with pytest.raises(ValueError, match="'y' must be integer class labels"):
        model(x, t, y.float())


# ----------------------------------------------------------------------------- training, sampling


def _synthetic_latents(model, n=8):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=g)
    labels = torch.arange(n) % 4
    return base[labels] + 0.05 * torch.randn(n, *base.shape[1:], generator=g), labels


def _train(model, objective, steps=40):
    """AdamW on the synthetic latents; the losses of every step (all finite)."""
    x, y = _synthetic_latents(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = objective.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("registers", [0, 4])
def test_flow_training_loss_falls_and_registers_learn(registers):
    torch.manual_seed(0)
    model = small("LightningDiT", num_registers=registers, register_start=1, class_dropout_prob=0.0)
    losses = _train(model, FlowMatching())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    if registers:
        assert model.register_tokens.grad is not None and model.register_tokens.grad.abs().sum() > 0


def test_dit_epsilon_objective_with_learned_variance():
    torch.manual_seed(0)
    model = small("DiT", class_dropout_prob=0.0)
    assert model.out_channels == 8
    losses = _train(model, GaussianDiffusion())
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8, losses


def test_samplers():
    model = perturb(small("LightningDiT", num_registers=4, register_start=1)).eval()
    noise, _, y = batch(model)
    out = sample_euler(model, noise, y, steps=6, cfg_scale=2.0, cfg_interval=(0.1, 1.0), null_class=10)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    # One step of the sampler is x - (1 - t') (x - x_hat) / 1 from t = 1: check it by hand.
    one = sample_euler(model, noise, y, steps=2, cfg_scale=1.0)
    x_hat = model(noise, torch.ones(2), y)
    assert torch.allclose(one, x_hat, atol=1e-5)
    dit = perturb(small("DiT")).eval()
    noise, _, y = batch(dit)
    out = sample_ddim(dit, noise, y, steps=5, cfg_scale=1.5, null_class=10)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_bf16_autocast_on_the_fused_path():
    model = perturb(small("LightningDiT", num_registers=4, register_start=1))
    x, y = _synthetic_latents(model, n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FlowMatching().loss(model, x, y)
    loss.backward()
    assert torch.isfinite(loss) and model.register_tokens.grad is not None
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = small("LightningDiT", num_registers=4, register_start=1, class_dropout_prob=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)  # different data on each rank
    x, y = _synthetic_latents(model, n=4)
    x = x + rank
    for _ in range(3):
        loss = FlowMatching().loss(ddp, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The ranks report to the parent through the manager rather than by all_gather: a gloo
    # work that holds Python-owned tensors is freed on gloo's own thread, which needs the GIL,
    # and when that happens during interpreter exit the process aborts ("terminate called
    # without an active exception", seen in about 1 run in 20 with all_gather + barrier).
    results[rank] = (
        torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes(),
        model.register_tokens.grad.numpy().tobytes(),
        bool(model.register_tokens.grad.abs().sum() > 0),
    )
    del ddp, opt
    dist.destroy_process_group()


def test_ddp_two_cpu_processes(tmp_path):
    """gloo DDP on 2 CPU processes: register gradients are all-reduced, both ranks end equal."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    (params0, grads0, nonzero0), (params1, grads1, nonzero1) = results[0], results[1]
    assert params0 == params1, "parameters differ between the ranks after 3 DDP steps"
    assert grads0 == grads1, "register gradients differ between the ranks (not all-reduced)"
    assert nonzero0 and nonzero1, "register gradients are zero"


# ----------------------------------------------------------------------------- instrumentation


def test_outlier_report_by_block_and_noise_level(tmp_path):
    model = perturb(small("LightningDiT", num_registers=4, register_start=1)).eval()
    x, _, y = batch(model)
    with dsr_kernels.outliers.collect(model) as report, torch.no_grad():
        for t in (0.2, 0.8):
            report.set_tag(f"t={t}")
            model(x, torch.full((2,), t), y)
    records = report.records()
    layers = [f"blocks.{i}" for i in range(3)] + ["final_layer"]  # final_layer: its norm's input tokens
    assert {(r.tag, r.layer) for r in records} == {(f"t={t}", layer) for t in (0.2, 0.8) for layer in layers}
    by = {(r.tag, r.layer): r for r in records}
    assert by[("t=0.2", "blocks.0")].tokens == 2 * 16 and by[("t=0.2", "blocks.1")].tokens == 2 * (16 + 4)
    assert by[("t=0.2", "blocks.0")].register_share == 0.0 and by[("t=0.2", "blocks.2")].register_share > 0
    assert 0 < by[("t=0.8", "blocks.2")].top1pct_key_share <= 1
    assert report.plot(str(tmp_path / "p.png")).endswith("p.png")


def test_dit_register_share_counts_its_in_sequence_registers():
    """DiT's registers, once in the sequence, are prefix tokens of every later block's
    attention: collect()'s register share is theirs (0 before register_start)."""
    model = create_model("DiT-S/2", input_size=8, depth=3, num_registers=4, register_start=1).eval()
    with dsr_kernels.outliers.collect(model) as report:
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    share = {r.layer: r.register_share for r in report.records()}
    assert share["blocks.0"] == 0.0
    assert 0.0 < share["blocks.1"] <= 1.0 and 0.0 < share["blocks.2"] <= 1.0
