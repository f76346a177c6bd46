"""dsr_kernels.integrations.diffusers on diffusers' video transformers (Latte, CogVideoX, Wan, HunyuanVideo):
tiny random configs, each with its rotary embeddings on (Latte has none), against diffusers' own attention."""

import importlib.util
import inspect
import warnings

import pytest
import torch

import dsr_kernels
from utils import assert_close, assert_within_eager_error

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed (.ci/run installs it: pip install diffusers)", allow_module_level=True)

import diffusers  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from test_integrations_diffusers import _output_and_grads  # noqa: E402

from dsr_kernels.integrations import diffusers as integration  # noqa: E402


def _latte(g):
    """Spatial blocks (self- and cross-attention within each frame) and temporal blocks (across the frames)."""
    m = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, caption_channels=12, cross_attention_dim=16, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, video_length=3,
    )  # fmt: skip
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # [B, C, F, H, W] latents: 3 frames of 4 x 4 patches
    enc, t = torch.randn(2, 5, 12, generator=g), torch.tensor([3, 7])
    return m, x, lambda model, x: model(x, timestep=t, encoder_hidden_states=enc.to(x.dtype)).sample


def _cogvideox(g):
    """CogVideoX-5B's setting: rotary embeddings (the pipeline computes them; the model takes them)."""
    m = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=5, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    x = torch.randn(2, 3, 4, 8, 8, generator=g)  # [B, F, C, H, W] latents: 3 frames of 4 x 4 patches
    enc, t = torch.randn(2, 5, 12, generator=g), torch.tensor([3, 7])
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3)

    def run(model, x):
        e, r = enc.to(x.dtype), tuple(c.to(x.dtype) for c in rope)
        return model(x, e, timestep=t, image_rotary_emb=r).sample

    return m, x, run


def _wan(g):
    """Self-attention with Wan's 3-D rotary embeddings (computed by the model), text cross-attention."""
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )  # fmt: skip
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # [B, C, F, H, W]
    enc, t = torch.randn(2, 5, 12, generator=g), torch.tensor([3, 7])
    return m, x, lambda model, x: model(x, timestep=t, encoder_hidden_states=enc.to(x.dtype)).sample


def _hunyuan_video(g):
    """A double- and a single-stream block ([video ; text], rotary embeddings on the video tokens, padded text
    masked) and a token-refiner block."""
    m = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # [B, C, F, H, W]
    enc, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padded caption tokens
    t, guidance = torch.tensor([3, 7]), torch.tensor([3.0, 5.0])

    def run(model, x):
        e, p, gd = enc.to(x.dtype), pooled.to(x.dtype), guidance.to(x.dtype)
        return model(
            x, timestep=t, encoder_hidden_states=e, encoder_attention_mask=mask, pooled_projections=p, guidance=gd
        ).sample

    return m, x, run


MODELS = {"Latte": _latte, "CogVideoX": _cogvideox, "Wan": _wan, "HunyuanVideo": _hunyuan_video}
ATTENTION_LAYERS = {"Latte": 3, "CogVideoX": 1, "Wan": 2, "HunyuanVideo": 3}
# The attention modules whose processor rotates q and k; the kernel does it instead.
ROTARY_LAYERS = {
    "Latte": [],
    "CogVideoX": ["transformer_blocks.0.attn1"],
    "Wan": ["blocks.0.attn1"],
    "HunyuanVideo": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
}


def _build(name):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, x, run = MODELS[name](g)
    with torch.no_grad():  # weights away from diffusers' zero init (adaLN-zero, output layers)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), x, run


def test_cogvideox_rotary_embeddings_reach_the_patched_processor():
    """The processor took (attn, hidden_states, *args, **kwargs): diffusers' Attention passes a keyword on to
    its processor only if the processor's __call__ names it, so image_rotary_emb was dropped, with a log line
    (the output changed by what the rotary embeddings do: 3.9% relative in CogVideoX-5B's setting)."""
    model, x, run = _build("CogVideoX")
    with torch.no_grad():
        expected = run(model, x)
        dsr_kernels.patch(model)
        got = run(model, x)
    proc = model.get_submodule("transformer_blocks.0.attn1").processor
    assert "image_rotary_emb" in inspect.signature(proc.__call__).parameters  # what diffusers reads
    assert proc.rope_path == "kernel"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _count_calls(monkeypatch):
    """Records each attention product the integration runs: whether the kernel got rotary tables."""
    calls = []
    real = integration.attention
    real_sdpa = integration.scaled_dot_product_attention

    def attention(*a, **k):
        calls.append(k.get("rope") is not None)
        return real(*a, **k)

    def sdpa(*a, **k):
        calls.append(False)
        return real_sdpa(*a, **k)

    monkeypatch.setattr(integration, "attention", attention)
    monkeypatch.setattr(integration, "scaled_dot_product_attention", sdpa)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_diffusers_attention_within_the_eager_error(name, monkeypatch):
    model, x, run = _build(name)
    oracle_out, oracle_grads = _output_and_grads(_build(name)[0], x, run, torch.float64)
    eager_out, eager_grads = _output_and_grads(model, x, run)

    calls = _count_calls(monkeypatch)
    names = dsr_kernels.patch(model)
    assert len(names) == ATTENTION_LAYERS[name]
    out, grads = _output_and_grads(model, x, run)
    # every attention product ran on the fused op, the rotary ones with the tables in the kernel
    assert len(calls) == ATTENTION_LAYERS[name] and sum(calls) == len(ROTARY_LAYERS[name])
    assert [n for n in names if model.get_submodule(n).processor.rope_path == "kernel"] == ROTARY_LAYERS[name]
    assert_within_eager_error("out", out, oracle_out.float(), eager_out, torch.float32, reduction=64)
    for i, (g, r, e) in enumerate(zip(grads, oracle_grads, eager_grads, strict=True)):
        assert_within_eager_error(f"grad {i}", g, r.float(), e, torch.float32, reduction=64)


@pytest.mark.parametrize("name", list(MODELS))
def test_statistics_are_recorded_for_every_attention_layer(name):
    model, x, run = _build(name)
    names = dsr_kernels.patch(model, num_kv_registers=2, sinks=True)
    with dsr_kernels.outliers.collect(model) as report, torch.no_grad():
        run(model, x)
    records = [r for r in report.records() if r.entropy is not None]
    assert {r.layer for r in records} == set(names)
    assert all(0 < r.register_share < 1 for r in records)


@pytest.mark.parametrize("name", [n for n in MODELS if ROTARY_LAYERS[n]])
def test_the_kernels_rotation_is_diffusers_rotation_with_registers_and_sinks(name, monkeypatch):
    """The same patched model (registers and sinks included) with the tables in the kernel and with the
    processor rotating q and k as diffusers does: registers are never rotated on either path."""
    model, x, run = _build(name)
    names = dsr_kernels.patch(model, num_kv_registers=2, sinks=True)
    with torch.no_grad():
        for n in names:  # registers and sinks away from their init, so that they weigh
            proc = model.get_submodule(n).processor
            for p in (proc.register_k, proc.register_v, proc.sinks):
                p.normal_(generator=torch.Generator().manual_seed(2))
        calls = _count_calls(monkeypatch)
        in_kernel = run(model, x)
        assert sum(calls) == len(ROTARY_LAYERS[name])
        monkeypatch.setattr(integration, "_ROPE_PLANS", {})
        by_diffusers = run(model, x)
        assert sum(calls) == len(ROTARY_LAYERS[name])  # no tables reached the kernel this time
    torch.testing.assert_close(in_kernel, by_diffusers, atol=1e-5, rtol=1e-5)


def test_tables_that_need_a_gradient_stay_with_diffusers():
    """The kernel takes constant tables: tables that require a gradient are applied by the processor, which
    gives them their gradient (HunyuanVideo's double-stream attention, called as its block calls it)."""
    model, _, _ = _build("HunyuanVideo")
    attn = model.get_submodule("transformer_blocks.0.attn")
    g = torch.Generator().manual_seed(3)
    video, text = torch.randn(2, 12, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    angles = torch.randn(12, 8, generator=g).repeat_interleave(2, -1)

    def run():
        cos, sin = angles.cos().requires_grad_(), angles.sin().requires_grad_()
        out = torch.cat(attn(video, text, image_rotary_emb=(cos, sin)), dim=1)
        out.square().sum().backward()
        return out.detach(), cos.grad, sin.grad

    expected = run()
    dsr_kernels.patch(model)
    got = run()
    assert attn.processor.rope_path == "diffusers" and "require a gradient" in attn.processor.rope_reason
    for name, a, b in zip(("out", "cos.grad", "sin.grad"), got, expected, strict=True):
        assert_close(name, a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, bypassing, dsr_calls",
    [
        ("Wan", None, 2),
        ("HunyuanVideo", "AttnProcessor2_0 x 1", 2),  # the token refiner's; the video blocks use the dispatcher
        ("CogVideoX", "CogVideoXAttnProcessor2_0 x 1", 0),
        ("Latte", "AttnProcessor2_0 x 3", 0),
    ],
)
def test_set_attention_backend_dsr(name, bypassing, dsr_calls, monkeypatch):
    """Processors that use diffusers' dispatcher run "dsr" (diffusers rotates q and k); the others keep torch's
    attention and set_attention_backend says so, naming them."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    calls = []
    real = integration._fused_sdpa
    monkeypatch.setattr(integration, "_fused_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    active = _AttentionBackendRegistry._active_backend
    model, x, run = _build(name)
    try:
        with torch.no_grad():
            expected = run(model, x)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.set_attention_backend("dsr")
            got = run(model, x)
        said = [str(w.message) for w in caught if "set_attention_backend('dsr')" in str(w.message)]
        if bypassing is None:
            assert said == []
        else:
            assert len(said) == 1 and f"({bypassing})" in said[0], said
        assert len(calls) == dsr_calls
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
        dsr_kernels.patch(model)  # now every attention module runs the fused op: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.set_attention_backend("dsr")
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


def test_tables_for_a_call_the_kernel_does_not_take_are_applied_before_it():
    """A call the fused op takes as it is gets the tables in the kernel; one that needs the drop-in's
    broadcasting (3-D q, k, v here) has q and k rotated first: the same attention either way."""
    from dsr_kernels.rope import apply_rope, rope_1d_tables

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    rope = rope_1d_tables(10, 8, style="interleaved")
    expected = torch.nn.functional.scaled_dot_product_attention(
        apply_rope(q, *rope, "interleaved"), apply_rope(k, *rope, "interleaved"), v
    )
    proc = integration.DSRAttnProcessor(object(), heads=2, head_dim=8)
    token = integration._CURRENT.set(integration._Call(proc, "auto", rope=rope))
    try:
        in_kernel = integration._fused_sdpa(q, k, v)
        rotated_first = integration._fused_sdpa(q[0], k[0], v[0])
    finally:
        integration._CURRENT.reset(token)
    torch.testing.assert_close(in_kernel, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rotated_first, expected[0], atol=1e-6, rtol=1e-5)
