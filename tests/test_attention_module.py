"""RegisterAttention: timm-compatible parameters, registers, sinks, statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsr_kernels import RegisterAttention
from utils import assert_close


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (qkv_bias=True, no qk-norm), verbatim in substance."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def test_loads_timm_state_dict_and_matches():
    timm_attn = TimmAttention(96, 4)
    ours = RegisterAttention(96, 4, qkv_bias=True)  # (timm's default is qkv_bias=False, as ours)
    ours.load_state_dict(timm_attn.state_dict(), strict=True)
    x = torch.randn(2, 37, 96)
    assert_close("out", ours(x), timm_attn(x), atol=2e-6)
    mask = torch.rand(2, 1, 37, 37) > 0.3
    mask[..., 0] = True
    assert_close("masked out", ours(x, mask), timm_attn(x, mask), atol=2e-6)


def test_registers_and_sinks_are_learned_and_match_concatenation():
    torch.manual_seed(1)
    m = RegisterAttention(64, 4, num_kv_registers=5, sinks=True)
    assert m.register_k.shape == (4, 5, 16) and m.sinks.shape == (4,)
    with torch.no_grad():
        m.sinks.normal_()
    x = torch.randn(3, 19, 64)
    out, stats = m(x, return_stats=True)
    assert stats.key_mass.shape == (3, 4, 5 + 19) and stats.register_share.shape == (3, 4, 19)

    qkv = m.qkv(x).view(3, 19, 3, 4, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    k_cat = torch.cat([m.register_k.expand(3, -1, -1, -1), k], 2)
    v_cat = torch.cat([m.register_v.expand(3, -1, -1, -1), v], 2)
    zero_key = torch.zeros(3, 4, 1, 16)  # the sink: one more logit, no value
    s = torch.cat([q @ k_cat.transpose(-1, -2) / 4.0, m.sinks[None, :, None, None].expand(3, 4, 19, 1)], -1)
    p = s.softmax(-1)
    manual = p @ torch.cat([v_cat, zero_key], 2)
    expected = m.proj(manual.transpose(1, 2).reshape(3, 19, 64))
    assert_close("out", out, expected, atol=2e-6)

    out.square().sum().backward()
    for name in ("register_k", "register_v", "sinks", "qkv.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backends_agree(backend):
    m = RegisterAttention(48, 3, num_kv_registers=2)
    x = torch.randn(2, 11, 48)
    expected = m(x)
    m.backend = backend
    assert_close("out", m(x), expected, atol=1e-5)


def test_bf16_autocast():
    m = RegisterAttention(32, 2, num_kv_registers=3, sinks=True)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.register_k.grad is not None and m.register_k.grad.dtype == torch.float32


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        RegisterAttention(50, 3)
    with pytest.raises(ValueError, match="num_kv_registers"):
        RegisterAttention(48, 3, num_kv_registers=-1)
