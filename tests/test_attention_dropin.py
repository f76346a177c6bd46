"""flash_attn_func and scaled_dot_product_attention: the contracts they replace."""

import pytest
import torch
import torch.nn.functional as F

import dsr_kernels
from dsr_kernels.reference.attention import attention_ref
from utils import assert_close

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


def test_sdpa_bad_arguments():
    q, k, v = _sdpa_inputs(grad=False)
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        mask = torch.ones(23, 31, dtype=torch.bool)
        dsr_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        dsr_kernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    with pytest.raises(ValueError, match="'attn_mask'.*broadcastable"):
        dsr_kernels.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="'query' must be 3-D or 4-D"):
        dsr_kernels.scaled_dot_product_attention(q[0, 0, 0], k, v)
