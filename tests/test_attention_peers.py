"""flash-attn's own test rule, on its awkward shapes, for every backend of dsr_kernels.attention.

flash-attn's ``test_flash_attn_output`` / ``test_flash_attn_causal`` accept a kernel whose
error against a float64-accurate reference is at most twice the error of the same
computation done by plain PyTorch at the input dtype. This file ports that rule (through
tests/test_attention.py's ``check_case``, which applies it to out, the four statistics
and every gradient) and flash-attn's sequence-length pairs, with head dims from 32 to 256
(72, 80 and 160 included), bottom-right causal masking, and MQA / GQA. Sizes are small so
that the Triton interpreter runs them in CI. The comparisons with PyTorch's SDPA over its
argument space are in tests/test_attention_dropin.py.
"""

import pytest
import torch
from test_attention import CPU, Case, check_case, requires_interpreter

# flash-attn's (seqlen_q, seqlen_k) pairs, each with a head dim, dtype, causal flag and
# K/V head count spread over them (bf16 / fp16: the dtypes flash-attn tests).
PEER_CASES = [
    Case(H=2, Nq=1, Nk=147, D=32, causal=True, dtype=torch.bfloat16),
    Case(H=4, Hk=1, Nq=113, Nk=203, D=72, dtype=torch.float16),  # MQA
    Case(H=4, Hk=2, Nq=128, Nk=217, D=80, causal=True, dtype=torch.bfloat16),  # GQA
    Case(H=2, Nq=113, Nk=211, D=160, dtype=torch.float16),
    Case(H=4, Hk=2, Nq=108, Nk=256, D=128, causal=True, dtype=torch.float16),
    Case(H=2, Nq=147, Nk=1, D=256, dtype=torch.bfloat16),
    Case(H=2, Nq=147, Nk=1, D=64, causal=True, dtype=torch.float16),  # only the last query sees the key
    Case(H=2, Nq=113, Nk=203, D=96, causal=True, R=4, sinks=True, dtype=torch.bfloat16),  # with our extras
]


@pytest.mark.parametrize("case", PEER_CASES, ids=str)
@pytest.mark.parametrize("backend", [CPU, "torch", pytest.param("triton", marks=requires_interpreter)])
def test_flash_attn_rule_on_flash_attn_shapes(case, backend):
    check_case(case, backend)
