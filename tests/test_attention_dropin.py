"""flash_attn_func and scaled_dot_product_attention: the contracts they replace."""

import pytest
import torch
import torch.nn.functional as F

import dsr_kernels
from dsr_kernels.reference.attention import attention_ref
from utils import assert_close, assert_within_eager_error

ATOL = 2e-6  # float32, same math, other summation order


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq, nk", [(37, 37), (20, 45), (45, 20)])
def test_flash_attn_func_layout_and_causal_alignment(causal, nq, nk):
    B, H, D = 2, 3, 40
    q = torch.randn(B, nq, H, D, requires_grad=True)
    k = torch.randn(B, nk, H, D, requires_grad=True)
    v = torch.randn(B, nk, H, D, requires_grad=True)
    out = dsr_kernels.flash_attn_func(q, k, v, causal=causal)
    assert out.shape == (B, nq, H, D) and out.is_contiguous()
    ref, _ = attention_ref(
        *(t.transpose(1, 2) for t in (q, k, v)),
        causal_offset=nk - nq if causal else None,  # flash-attn: bottom-right aligned
        compute_dtype=torch.float32,
    )
    assert_close("out", out, ref.transpose(1, 2), atol=ATOL)
    dout = torch.randn_like(out)
    expected = _grads(ref.transpose(1, 2), (q, k, v), dout)
    for name, g, r in zip("qkv", _grads(out, (q, k, v), dout), expected, strict=True):
        assert_close(f"d{name}", g, r, atol=1e-5)


def test_flash_attn_func_lse_registers_sinks_gqa():
    B, N, H, Hk, D, R = 2, 29, 4, 2, 32, 3
    q, k, v = torch.randn(B, N, H, D), torch.randn(B, N, Hk, D), torch.randn(B, N, Hk, D)
    rk, rv, sinks = torch.randn(H, R, D), torch.randn(H, R, D), torch.randn(H)
    out, lse, probs = dsr_kernels.flash_attn_func(
        q, k, v, softmax_scale=0.2, return_attn_probs=True, deterministic=True, kv_registers=(rk, rv), sinks=sinks
    )
    assert probs is None and lse.shape == (B, H, N) and lse.dtype == torch.float32
    k_full = k.repeat_interleave(H // Hk, dim=2).transpose(1, 2)
    v_full = v.repeat_interleave(H // Hk, dim=2).transpose(1, 2)
    ref, stats = attention_ref(q.transpose(1, 2), k_full, v_full, kv_registers=(rk, rv), sinks=sinks, scale=0.2)
    assert_close("out", out, ref.transpose(1, 2), atol=ATOL)
    assert_close("lse", lse, stats.lse, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(dropout_p=0.1), "dropout_p"),
        (dict(window_size=(8, 8)), "window_size"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
    ],
)
def test_flash_attn_func_unsupported_arguments_raise(kwargs, word):
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(NotImplementedError, match=word):
        dsr_kernels.flash_attn_func(q, q, q, **kwargs)


def test_flash_attn_func_bad_gqa_heads():
    q, k = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 3, 16)
    with pytest.raises(ValueError, match="'k' has 3 heads"):
        dsr_kernels.flash_attn_func(q, k, k)


def _sdpa_inputs(B=2, H=3, L=23, S=31, E=24, grad=True):
    return [torch.randn(*s, requires_grad=grad) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, E))]


MASKS = {
    "bool_broadcast": lambda L, S: torch.rand(1, 1, L, S) > 0.4,
    "bool_per_batch": lambda L, S: torch.rand(2, 1, 1, S) > 0.4,
    "float_2d": lambda L, S: torch.randn(L, S),
    "float_full": lambda L, S: torch.randn(2, 3, L, S),
}


@pytest.mark.parametrize("mask", list(MASKS))
def test_sdpa_masks_match_torch(mask):
    q, k, v = _sdpa_inputs()
    attn_mask = MASKS[mask](23, 31)
    if attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = True  # every query can attend something (torch gives NaN otherwise)
    out = dsr_kernels.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    assert_close("out", out, expected, atol=ATOL)
    dout = torch.randn_like(out)
    for name, g, r in zip("qkv", _grads(out, (q, k, v), dout), _grads(expected, (q, k, v), dout), strict=True):
        assert_close(f"d{name}", g, r, atol=1e-5)


@pytest.mark.parametrize("L, S", [(23, 31), (31, 23), (17, 17)])
def test_sdpa_is_causal_is_top_left_like_torch(L, S):
    q, k, v = _sdpa_inputs(L=L, S=S, grad=False)
    out = dsr_kernels.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert_close("out", out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), atol=ATOL)


def test_sdpa_gqa_and_3d_inputs():
    q, k, v = torch.randn(2, 6, 11, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    out = dsr_kernels.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_close("gqa", out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=ATOL)
    q3, k3, mask3 = torch.randn(3, 11, 16), torch.randn(3, 13, 16), torch.randn(3, 11, 13)
    out3 = dsr_kernels.scaled_dot_product_attention(q3, k3, k3, attn_mask=mask3)
    assert out3.shape == (3, 11, 16)
    assert_close("3-D", out3, F.scaled_dot_product_attention(q3, k3, k3, attn_mask=mask3), atol=ATOL)


def test_sdpa_registers_equal_concatenation():
    q, k, v = _sdpa_inputs(grad=False)
    rk, rv = torch.randn(3, 4, 24), torch.randn(3, 4, 24)
    out = dsr_kernels.scaled_dot_product_attention(q, k, v, kv_registers=(rk, rv))
    k_cat = torch.cat([rk.expand(2, -1, -1, -1), k], 2)
    v_cat = torch.cat([rv.expand(2, -1, -1, -1), v], 2)
    assert_close("out", out, F.scaled_dot_product_attention(q, k_cat, v_cat), atol=ATOL)


def test_sdpa_bad_arguments_raise_torchs_types_with_torchs_names():
    q, k, v = _sdpa_inputs(grad=False)
    sdpa = dsr_kernels.scaled_dot_product_attention
    cases = [
        (dict(attn_mask=torch.ones(23, 31, dtype=torch.bool), is_causal=True), "attn_mask should not be set"),
        (dict(attn_mask=torch.ones(5, 31, dtype=torch.bool)), "'attn_mask' of shape \\[5, 31\\] does not broadcast"),
        (dict(attn_mask=torch.ones(31, dtype=torch.bool)), "'attn_mask' must be at least 2-D"),
        (dict(attn_mask=torch.ones(23, 31, dtype=torch.int32)), "'attn_mask' must be bool or floating"),
        (dict(scale=float("nan")), "'scale' must be a finite number"),
    ]
    for kwargs, words in cases:
        for error in (ValueError, RuntimeError):  # SDPAError is both: torch raises RuntimeError
            with pytest.raises(error, match=words):
                sdpa(q, k, v, **kwargs)
    with pytest.raises(RuntimeError, match="at least 2-D"):
        sdpa(q[0, 0, 0], k, v)
    with pytest.raises(RuntimeError, match="same dtype.*key.dtype torch.float64"):
        sdpa(q, k.double(), v)
    with pytest.raises(RuntimeError, match="same head dim"):
        sdpa(q, k[..., :8], v)
    with pytest.raises(RuntimeError, match="same sequence length"):
        sdpa(q, k, v[:, :, :5])
    with pytest.raises(RuntimeError, match="query has 3 heads and key / value 2"):
        sdpa(q, k[:, :2], v[:, :2])
    with pytest.raises(RuntimeError, match="enable_gqa=True.*key \\(2\\)"):
        sdpa(q, k[:, :2], v[:, :2], enable_gqa=True)
    with pytest.raises(RuntimeError, match="batch dims"):
        sdpa(q, k[:, :, None].expand(2, 3, 4, 31, 24).transpose(0, 2), v)
    with pytest.raises(TypeError, match="argument 'query' \\(position 1\\) must be Tensor, not list"):
        sdpa([1.0], k, v)
    with pytest.raises(TypeError, match="'query' must be a floating tensor"):
        sdpa(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="one device"):
        sdpa(q, k.to("meta"), v)


def _torch_and_ours(*args, **kwargs):
    out = dsr_kernels.scaled_dot_product_attention(*args, **kwargs)
    return out, F.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "shapes, kwargs",
    [
        (((2, 3, 0, 24), (2, 3, 31, 24), (2, 3, 31, 16)), {}),  # L = 0
        (((0, 3, 23, 24), (0, 3, 31, 24), (0, 3, 31, 16)), {}),  # empty batch
        (((2, 3, 23, 24), (2, 3, 0, 24), (2, 3, 0, 16)), {}),  # S = 0: zeros
        (((2, 3, 23, 24), (2, 3, 31, 24), (2, 3, 31, 40)), {}),  # Ev != E
        (((2, 4, 3, 23, 24), (2, 4, 3, 31, 24), (2, 4, 3, 31, 24)), {}),  # 5-D
        (((1, 3, 23, 24), (2, 3, 31, 24), (2, 3, 31, 24)), {}),  # query batch broadcast
        (((2, 3, 23, 24), (1, 3, 31, 24), (1, 3, 31, 24)), {}),  # key / value batch broadcast
        (((2, 3, 23, 24), (2, 1, 31, 24), (2, 1, 31, 24)), {}),  # one K/V head broadcast (MQA)
        (((2, 1, 23, 24), (2, 3, 31, 24), (2, 3, 31, 24)), {}),  # one query head broadcast
        (((23, 24), (31, 24), (31, 16)), {}),  # 2-D
        (((2, 6, 23, 24), (2, 2, 31, 24), (2, 2, 31, 40)), dict(enable_gqa=True)),  # GQA with Ev != E
        (((2, 3, 23, 24), (2, 3, 31, 24), (2, 3, 31, 24)), dict(is_causal=True, scale=0.7)),  # L != S causal
        (((2, 3, 31, 24), (2, 3, 23, 24), (2, 3, 23, 24)), dict(is_causal=True)),  # early queries: no key
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "-".join("x".join(map(str, s)) for s in x),
)
def test_sdpa_contract_matches_torch(shapes, kwargs):
    """Shape, dtype and values as torch's; the error against torch in float64 at most 2x torch's own in float32."""
    inputs = [torch.randn(*s, requires_grad=True) for s in shapes]
    out, expected = _torch_and_ours(*inputs, **kwargs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    oracle = F.scaled_dot_product_attention(*inputs64, **kwargs)
    K = max(shapes[1][-2], shapes[0][-2], shapes[0][-1])
    assert_within_eager_error("out", out, oracle, expected, torch.float32, reduction=K)
    if out.numel():
        dout = torch.randn_like(out)
        ours, eager = _grads(out, inputs, dout), _grads(expected, inputs, dout)
        grads = zip(ours, eager, _grads(oracle, inputs64, dout.double()), strict=True)
        for name, (g, e, r) in zip("qkv", grads, strict=True):
            assert_within_eager_error(f"d{name}", g, r, e, torch.float32, reduction=K)


@pytest.mark.parametrize("mask_shape", [(31,) * 0 + (23, 31), (1, 23, 31), (3, 1, 31), (2, 1, 1, 31), (2, 3, 23, 31)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_of_every_broadcast_shape(mask_shape, kind):
    q, k, v = _sdpa_inputs(grad=False)
    mask = torch.rand(*mask_shape) > 0.3 if kind == "bool" else torch.randn(*mask_shape)
    out, expected = _torch_and_ours(q, k, v, attn_mask=mask)
    assert_close("out", out, expected, atol=ATOL)


def test_sdpa_fully_masked_rows_are_zero_as_torch():
    q, k, v = _sdpa_inputs(grad=False)
    mask = torch.rand(2, 1, 23, 31) > 0.5
    mask[:, :, 3] = False
    out, expected = _torch_and_ours(q, k, v, attn_mask=mask)
    assert_close("out", out, expected, atol=ATOL)
    assert out[:, :, 3].abs().max() == 0


def test_sdpa_non_contiguous_inputs():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _sdpa_inputs(grad=False))
    assert q.stride(-1) != 1
    out, expected = _torch_and_ours(q, k, v)
    assert_close("out", out, expected, atol=ATOL)
    qs, ks, vs = (t[:, :, ::2] for t in _sdpa_inputs(grad=False))  # strided rows: read in place
    out, expected = _torch_and_ours(qs, ks, vs)
    assert_close("out", out, expected, atol=ATOL)


def test_sdpa_gqa_reads_kv_in_place(monkeypatch):
    """enable_gqa: K/V reach the kernel with their own head count (no repeat)."""
    from dsr_kernels.ops import attention_dropin

    seen = {}
    real = attention_dropin.validated_attention

    def spy(fn, q, k, v, **kw):
        seen["shapes"] = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        return real(fn, q, k, v, **kw)

    monkeypatch.setattr(attention_dropin, "validated_attention", spy)
    q, k, v = torch.randn(2, 6, 11, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 8)
    out, expected = _torch_and_ours(q, k, v, enable_gqa=True)
    assert seen["shapes"] == ((2, 6, 11, 16), (2, 2, 13, 16), (2, 2, 13, 8))
    assert_close("out", out, expected, atol=ATOL)


def test_sdpa_falls_back_to_torch_with_one_warning(monkeypatch):
    from dsr_kernels.ops import attention_dropin

    monkeypatch.setattr(attention_dropin, "_WARNED", set())
    q, k, v = _sdpa_inputs(grad=False)
    with pytest.warns(UserWarning, match="dropout_p=0.5 > 0: running torch.nn.functional.scaled_dot_product_attention"):
        torch.manual_seed(0)
        out = dsr_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and reason
        dsr_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    mask = torch.randn(23, 31, requires_grad=True)
    with pytest.warns(UserWarning, match="float attn_mask that requires grad"):
        out = dsr_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (g,) = torch.autograd.grad(out.sum(), mask)
    (g_ref,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(), mask)
    assert_close("dmask", g, g_ref, atol=1e-5)
    rk, rv = torch.randn(3, 4, 24), torch.randn(3, 4, 24)  # registers: the first keys, never masked
    with pytest.warns(UserWarning, match="dropout_p=0.3"):
        torch.manual_seed(1)
        out = dsr_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.3, kv_registers=(rk, rv), is_causal=True)
    k_cat, v_cat = torch.cat([rk.expand(2, -1, -1, -1), k], 2), torch.cat([rv.expand(2, -1, -1, -1), v], 2)
    mask = torch.cat([torch.ones(23, 4, dtype=torch.bool), torch.ones(23, 31, dtype=torch.bool).tril()], 1)
    torch.manual_seed(1)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k_cat, v_cat, attn_mask=mask, dropout_p=0.3))
    with pytest.raises(NotImplementedError, match="no attention sinks"):
        dsr_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5, sinks=torch.zeros(3))


# ----------------------------------------------------------------------------- flash-attn family


def test_flash_attn_packed_forms_equal_the_unpacked_one():
    B, N, H, Hk, D = 2, 37, 4, 2, 40
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    out = dsr_kernels.flash_attn_qkvpacked_func(qkv, causal=True, softmax_scale=0.3)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    ref = dsr_kernels.flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    assert_close("qkvpacked", out, ref, atol=0)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    assert g.shape == qkv.shape  # one gradient in the packed layout, as flash-attn's
    for i, gi in enumerate(torch.autograd.grad(ref, (q, k, v), dout)):
        assert_close(f"d{'qkv'[i]}", g[:, :, i], gi, atol=0)

    q = torch.randn(B, N, H, D)
    kv = torch.randn(B, 29, 2, Hk, D)
    out, lse, probs = dsr_kernels.flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    ref, ref_lse, _ = dsr_kernels.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], return_attn_probs=True)
    assert probs is None
    assert_close("kvpacked", out, ref, atol=0)
    assert_close("kvpacked lse", lse, ref_lse, atol=0)
    with pytest.raises(ValueError, match="'qkv' must be 5-D \\[B, N, 3, H, D\\]"):
        dsr_kernels.flash_attn_qkvpacked_func(torch.randn(B, N, 2, H, D))
    with pytest.raises(ValueError, match="'kv' must be 5-D \\[B, N, 2, H, D\\]"):
        dsr_kernels.flash_attn_kvpacked_func(q, torch.randn(B, N, 3, H, D))


def test_flash_attn_lse_is_plus_inf_where_nothing_is_seen():
    """flash-attn's convention: a query that sees no key has softmax_lse = +inf (and out = 0)."""
    q, k = torch.randn(1, 9, 2, 16), torch.randn(1, 4, 2, 16)
    out, lse, _ = dsr_kernels.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    # bottom-right causal, 9 queries on 4 keys: query i sees keys j <= i - 5; queries 0..4 see none
    assert torch.isposinf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    assert out[:, :5].abs().max() == 0
    _, stats = dsr_kernels.flash_attn_func(q, k, k, causal=True, return_stats=True)
    assert torch.isneginf(stats.lse[:, :, :5]).all()  # the package's own convention in the statistics
    assert stats.key_mass.shape == (1, 2, 4) and stats.entropy.shape == (1, 2, 9)
    with pytest.raises(ValueError, match="return_attn_probs=True or return_stats=True"):
        dsr_kernels.flash_attn_func(q, k, k, return_attn_probs=True, return_stats=True)


def test_flash_attn_gqa_reads_kv_in_place(monkeypatch):
    from dsr_kernels.ops import attention_dropin

    seen = {}
    real = attention_dropin.validated_attention

    def spy(fn, q, k, v, **kw):
        seen["k"] = (tuple(k.shape), k.data_ptr())
        return real(fn, q, k, v, **kw)

    monkeypatch.setattr(attention_dropin, "validated_attention", spy)
    q, k, v = torch.randn(2, 11, 6, 16), torch.randn(2, 13, 2, 16), torch.randn(2, 13, 2, 24)
    out = dsr_kernels.flash_attn_func(q, k, v)
    assert seen["k"] == ((2, 2, 13, 16), k.data_ptr()) and out.shape == (2, 11, 6, 24)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    assert_close("gqa", out, ref.transpose(1, 2), atol=ATOL)
