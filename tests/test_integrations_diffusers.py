"""dsr_kernels.integrations.diffusers: the "dsr" attention backend and DSRAttnProcessor on tiny random
DiT, PixArt, SD3 and Flux transformers, against diffusers' default attention."""

import importlib.util
import warnings

import pytest
import torch

import dsr_kernels
from utils import assert_within_eager_error

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed (.ci/run installs it: pip install diffusers)", allow_module_level=True)

import diffusers  # noqa: E402

from dsr_kernels.integrations import diffusers as integration  # noqa: E402


def _dit(g):
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.tensor([3, 7]), torch.tensor([1, 2])
    return m, x, lambda model, x: model(x, timestep=t, class_labels=y).sample


def _pixart(g):
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=24, num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )  # fmt: skip
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 5, 24, generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padded caption tokens: diffusers' key mask
    t = torch.tensor([3, 7])
    cond = {"resolution": None, "aspect_ratio": None}

    def run(model, x):
        e = enc.to(x.dtype)
        return model(x, encoder_hidden_states=e, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=cond)

    return m, x, lambda model, x: run(model, x).sample


def _sd3(g):
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 12, generator=g)
    t = torch.tensor([3, 7])

    def run(model, x):
        return model(x, encoder_hidden_states=enc.to(x.dtype), pooled_projections=pooled.to(x.dtype), timestep=t)

    return m, x, lambda model, x: run(model, x).sample


def _flux(g):
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    x = torch.randn(2, 16, 4, generator=g)
    enc, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    t = torch.tensor([0.3, 0.7])
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(16, 3), torch.zeros(5, 3)

    def run(model, x):
        return model(
            hidden_states=x, encoder_hidden_states=enc.to(x.dtype), pooled_projections=pooled.to(x.dtype),
            timestep=t.to(x.dtype), img_ids=img_ids.to(x.dtype), txt_ids=txt_ids.to(x.dtype),
        ).sample  # fmt: skip

    return m, x, run


MODELS = {"DiT": _dit, "PixArt": _pixart, "SD3": _sd3, "Flux": _flux}
ATTENTION_LAYERS = {"DiT": 2, "PixArt": 4, "SD3": 2, "Flux": 2}


def _build(name):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, x, run = MODELS[name](g)
    with torch.no_grad():  # weights away from diffusers' zero init (adaLN-zero, output layers)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), x, run


def _output_and_grads(model, x, run, dtype=torch.float32):
    model = model.to(dtype)
    x = x.to(dtype).requires_grad_()
    out = run(model, x)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], dout)
    return out.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_diffusers_attention_within_the_eager_error(name, monkeypatch):
    model, x, run = _build(name)
    oracle_out, oracle_grads = _output_and_grads(_build(name)[0], x, run, torch.float64)
    eager_out, eager_grads = _output_and_grads(model, x, run)

    calls = []
    real = integration._fused_sdpa
    monkeypatch.setattr(integration, "_fused_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    names = dsr_kernels.patch(model)
    assert len(names) == ATTENTION_LAYERS[name]
    assert all(isinstance(model.get_submodule(n).processor, integration.DSRAttnProcessor) for n in names)
    out, grads = _output_and_grads(model, x, run)
    assert len(calls) == ATTENTION_LAYERS[name]  # every attention product went through the fused op
    assert_within_eager_error("out", out, oracle_out.float(), eager_out, torch.float32, reduction=64)
    for i, (g, r, e) in enumerate(zip(grads, oracle_grads, eager_grads, strict=True)):
        assert_within_eager_error(f"grad {i}", g, r.float(), e, torch.float32, reduction=64)


@pytest.mark.parametrize("name", list(MODELS))
def test_statistics_are_recorded_for_every_attention_layer(name):
    model, x, run = _build(name)
    names = dsr_kernels.patch(model, num_kv_registers=2, sinks=True)
    with dsr_kernels.outliers.collect(model) as report, torch.no_grad():
        run(model, x)
    recorded = {r.layer for r in report.records() if r.entropy is not None}
    assert recorded == set(names)
    assert all(0 < r.register_share < 1 for r in report.records() if r.layer in names)


def test_registers_and_sinks_are_trainable_parameters_of_the_model():
    model, x, run = _build("SD3")
    names = dsr_kernels.patch(model, num_kv_registers=3, sinks=True)
    proc = model.get_submodule(names[0]).processor
    assert proc.register_k.shape == (2, 3, 8) and proc.sinks.shape == (2,)
    keys = model.state_dict().keys()
    assert f"{names[0]}.processor.register_k" in keys and f"{names[0]}.processor.sinks" in keys
    out = run(model, x)
    out.square().mean().backward()
    assert proc.register_k.grad.abs().sum() > 0 and proc.register_v.grad.abs().sum() > 0
    assert proc.sinks.grad.abs().sum() > 0
    # patching again keeps the processor (and its parameters)
    assert dsr_kernels.patch(model, num_kv_registers=3) == names and model.get_submodule(names[0]).processor is proc


def test_set_attention_backend_dsr_and_the_context_manager(monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    calls = []
    real = integration._fused_sdpa
    monkeypatch.setattr(integration, "_fused_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    active = _AttentionBackendRegistry._active_backend
    model, x, run = _build("Flux")
    with torch.no_grad():
        expected = run(model, x)
        assert calls == []
        try:
            model.set_attention_backend("dsr")
            got = run(model, x)
        finally:
            _AttentionBackendRegistry.set_active_backend(active)  # set_attention_backend sets it process-wide
    assert len(calls) == 2  # the double-stream and the single-stream block
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    model2, _, _ = _build("Flux")
    with torch.no_grad(), attention_backend("dsr"):
        got2 = run(model2, x)
    assert len(calls) == 4 and _AttentionBackendRegistry._active_backend == active
    torch.testing.assert_close(got2, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "name, bypassing", [("DiT", "AttnProcessor2_0"), ("PixArt", "AttnProcessor2_0"), ("SD3", "JointAttnProcessor2_0")]
)
def test_set_attention_backend_dsr_warns_about_processors_without_the_dispatcher(name, bypassing):
    """These processors call torch's SDPA themselves: "dsr" cannot reach them, and says so (not silently)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    model, _, _ = _build(name)
    n = ATTENTION_LAYERS[name]
    try:
        with pytest.warns(UserWarning, match=rf"{n} attention module\(s\).*\({bypassing} x {n}\).*dsr_kernels.patch"):
            model.set_attention_backend("dsr")
        dsr_kernels.patch(model)  # now every attention module runs the fused op: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.set_attention_backend("dsr")
            if name == "DiT":  # Flux's processors use the dispatcher: "dsr" reaches them
                _build("Flux")[0].set_attention_backend("dsr")
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


def test_patch_bad_input():
    with pytest.raises(TypeError, match="neither a diffusers model nor a pipeline"):
        integration.patch(object())
    model, _, _ = _build("DiT")
    with pytest.raises(ValueError, match="'num_kv_registers' must be an int >= 0"):
        dsr_kernels.patch(model, num_kv_registers=-2)
    with pytest.raises(ValueError, match="'backend' must be one of"):
        dsr_kernels.patch(model, backend="flash")


def test_patch_a_pipeline_patches_its_transformer():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    model, _, _ = _build("DiT")
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    names = dsr_kernels.patch(pipe, num_kv_registers=2)
    assert names == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(isinstance(model.get_submodule(n).processor, integration.DSRAttnProcessor) for n in names)
