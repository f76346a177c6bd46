"""dsr_kernels.ttr_activation: compiled CPU/CUDA kernels and Triton against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

import dsr_kernels
from dsr_kernels import BackendUnavailable, ttr_activation
from dsr_kernels._extension import extension_loaded
from dsr_kernels.backends import triton_interpreting
from dsr_kernels.reference.ttr_activation import PATCH_VALUES, REGISTER_VALUES, ttr_activation_ref
from utils import assert_within_eager_error


@dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 257  # prefix + patches + registers
    F: int = 72
    K: int = 4
    prefix: int = 1
    registers: int = 1
    patch_values: str = "zero"
    register_value: str = "signed_max"
    approximate: str = "none"
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return (
            f"B{self.B}T{self.T}F{self.F}K{self.K}P{self.prefix}R{self.registers}-{self.patch_values}-"
            f"{self.register_value}-{self.approximate}-{str(self.dtype).replace('torch.', '')}"
        )

    def kw(self) -> dict:
        return dict(
            num_registers=self.registers,
            num_prefix_tokens=self.prefix,
            patch_values=self.patch_values,
            register_value=self.register_value,
            approximate=self.approximate,
        )


CASES = [
    Case(),  # ViT-B/16-256 shaped: 256 patches + 1 test-time register, CLS
    Case(T=292, F=80, K=36, prefix=0, dtype=torch.bfloat16),
    Case(T=37, F=83, K=1, prefix=5, registers=2, patch_values="mean", dtype=torch.float16),
    Case(T=113, F=257, K=7, prefix=0, patch_values="only_outliers", register_value="max"),
    Case(T=7, F=72, K=4, prefix=1, registers=3, patch_values="same", register_value="layer_signed_max"),
    Case(B=3, T=2, F=9, K=9, prefix=0, registers=1, patch_values="only_outliers", dtype=torch.bfloat16),  # 1 patch
    Case(T=65, F=3073, K=5, prefix=0, approximate="tanh", register_value="layer_signed_max", dtype=torch.float16),
    Case(T=257, F=1, K=1, prefix=0, patch_values="mean", approximate="tanh"),
    Case(T=33, F=100, K=0, prefix=0),  # no neurons: plain GELU
    Case(B=1, T=1, F=16, K=2, prefix=0, registers=1),  # only the register
]


def make_inputs(case: Case, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()) + seed)
    h = (torch.randn(case.B, case.T, case.F, generator=g) * 2.0).to(device=device, dtype=case.dtype)
    neurons = torch.randperm(case.F, generator=g)[: case.K]
    # Make the selected neurons behave like register neurons: a few large activations.
    if case.K:
        spikes = torch.randint(0, case.T, (case.B, case.K), generator=g)
        vals = (torch.rand(case.B, case.K, generator=g) * 20 + 5) * torch.sign(torch.randn(case.B, case.K, generator=g))
        hh = h.cpu().float()
        for b in range(case.B):
            hh[b, spikes[b], neurons] = vals[b]
        h = hh.to(device=device, dtype=case.dtype)
    dout = torch.randn(case.B, case.T, case.F, generator=g).to(device=device, dtype=case.dtype)
    return h, neurons, dout


def check_case(case: Case, backend: str, device: str = "cpu") -> None:
    h, neurons, dout = make_inputs(case, device)
    x = h.clone().requires_grad_(True)
    out = ttr_activation(x, neurons, backend=backend, **case.kw())
    assert out.shape == h.shape and out.dtype == case.dtype and out.is_contiguous()
    (dh,) = torch.autograd.grad(out, x, dout)

    x64 = h.cpu().double().requires_grad_(True)
    ref = ttr_activation_ref(x64, neurons, **case.kw())
    (dh_ref,) = torch.autograd.grad(ref, x64, dout.cpu().double())
    xe = h.cpu().clone().requires_grad_(True)
    eager = ttr_activation_ref(xe, neurons, compute_dtype=case.dtype, **case.kw())
    (dh_eager,) = torch.autograd.grad(eager, xe, dout.cpu())

    assert_within_eager_error("out", out, ref, eager, case.dtype)
    assert_within_eager_error("dh", dh, dh_ref, dh_eager, case.dtype)


requires_extension = pytest.mark.skipif(not extension_loaded(), reason="dsr_kernels._C is not built")
requires_interpreter = pytest.mark.skipif(
    not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (a GPU is present)"
)


@requires_extension
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_reference(case):
    check_case(case, "cpu")


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    check_case(case, "triton")


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_reference_backend(case):
    check_case(case, "reference")


@requires_extension
@pytest.mark.parametrize("patch_values", PATCH_VALUES)
@pytest.mark.parametrize("register_value", REGISTER_VALUES)
def test_every_variant_on_cpu(patch_values, register_value):
    check_case(
        Case(T=41, F=72, K=3, prefix=1, registers=2, patch_values=patch_values, register_value=register_value), "cpu"
    )


@requires_interpreter
@pytest.mark.parametrize("patch_values", PATCH_VALUES)
def test_every_patch_variant_on_triton(patch_values):
    check_case(Case(T=41, F=72, K=3, prefix=1, registers=2, patch_values=patch_values, register_value="max"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_and_triton_on_gpu_match_reference(case, backend):
    check_case(case, backend, device="cuda")


@requires_extension
def test_cpu_float64_and_gradcheck():
    h = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    for pv in PATCH_VALUES:
        for rv in REGISTER_VALUES:
            out = ttr_activation(h, [1, 5], patch_values=pv, register_value=rv, num_prefix_tokens=1, backend="cpu")
            ref = ttr_activation_ref(h, torch.tensor([1, 5]), patch_values=pv, register_value=rv, num_prefix_tokens=1)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            assert torch.autograd.gradcheck(
                lambda x, pv=pv, rv=rv: ttr_activation(x, [1, 5], patch_values=pv, register_value=rv, backend="cpu"),
                (h,),
            )


def test_semantics_by_hand():
    """One image, CLS + 3 patches + 1 register, one neuron: what each row gets."""
    h = torch.tensor([0.5, -7.0, 2.0, 1.0, 0.25], dtype=torch.float64).view(1, 5, 1)
    g = torch.nn.functional.gelu(h)
    out = ttr_activation(h, [0], num_prefix_tokens=1, backend="reference")
    assert out[0, 0, 0] == g[0, 0, 0]  # CLS keeps its value
    assert torch.all(out[0, 1:4, 0] == 0)  # patches zeroed
    assert out[0, 4, 0] == g[0, 2, 0]  # the register: the largest magnitude over all tokens, gelu(2)
    no_prefix = ttr_activation(h, [0], num_prefix_tokens=0, backend="reference")
    assert no_prefix[0, 0, 0] == 0  # without a prefix token, row 0 is a patch
    # A negative activation of largest magnitude keeps its sign: gelu(-0.75) = -0.17 beats gelu(0.1) = 0.05.
    h = torch.tensor([0.1, -0.75, 0.0], dtype=torch.float64).view(1, 3, 1)
    out = ttr_activation(h, [0], backend="reference")
    assert out[0, 2, 0] == torch.nn.functional.gelu(h)[0, 1, 0] < 0
    assert ttr_activation(h, [0], register_value="max", backend="reference")[0, 2, 0] > 0


@requires_extension
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_instruction_sets(capability):
    """Each vector path the CPU kernel can pick (as far as this processor has it) gives the reference's answer."""
    code = (
        "import torch, dsr_kernels, dsr_kernels._C as C\n"
        "from dsr_kernels.reference.ttr_activation import ttr_activation_ref\n"
        "h = torch.randn(3, 67, 131) * 4\n"
        "for approx in ('none', 'tanh'):\n"
        "    out = dsr_kernels.ttr_activation(h, [3, 130], approximate=approx, backend='cpu')\n"
        "    ref = ttr_activation_ref(h.double(), torch.tensor([3, 130]), approximate=approx)\n"
        "    err = float((out.double() - ref).abs().max())\n"
        "    assert err < 4e-6, err\n"
        "print(C.cpu_capability())\n"
    )
    env = dict(os.environ, DSR_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    picked = run.stdout.strip().splitlines()[-1]
    order = ["default", "avx2", "avx512"]
    assert order.index(picked) <= order.index(capability), (capability, picked)


def test_empty_or_none_neurons_is_gelu():
    h = torch.randn(2, 5, 8)
    for neurons in (None, [], torch.zeros(0, dtype=torch.int64)):
        for backend in ["reference"] + (["cpu"] if extension_loaded() else []):
            out = ttr_activation(h, neurons, backend=backend)
            torch.testing.assert_close(out, torch.nn.functional.gelu(h), rtol=2e-6, atol=1e-6)


def test_empty_batch():
    h = torch.randn(0, 5, 8)
    for backend in ["reference"] + (["cpu"] if extension_loaded() else []):
        assert ttr_activation(h, [1], backend=backend).shape == (0, 5, 8)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(neurons=[8]), ValueError, ["'neurons'", "8", "[0, 8)"]),
        (dict(neurons=[-1]), ValueError, ["'neurons'", "-1"]),
        (dict(neurons=[2, 2]), ValueError, ["distinct"]),
        (dict(neurons=torch.tensor([[1]])), ValueError, ["1-D"]),
        (dict(neurons=torch.tensor([1.0])), TypeError, ["int64"]),
        (dict(neurons=[1.5]), TypeError, ["ints"]),
        (dict(num_registers=0), ValueError, ["'num_registers'", ">= 1"]),
        (dict(num_registers=True), ValueError, ["'num_registers'"]),
        (dict(num_prefix_tokens=-1), ValueError, ["'num_prefix_tokens'"]),
        (dict(num_prefix_tokens=5), ValueError, ["exceed", "5 tokens"]),
        (dict(patch_values="median"), ValueError, ["'patch_values'", "'zero'"]),
        (dict(register_value="min"), ValueError, ["'register_value'"]),
        (dict(approximate="erf"), ValueError, ["'approximate'"]),
        (dict(backend="cuda"), BackendUnavailable, ["cuda"]),
        (dict(backend="gpu"), ValueError, ["'backend'"]),
        (dict(h=torch.randn(5, 8)), ValueError, ["'h'", "3-D", "[5, 8]"]),
        (dict(h=torch.randint(0, 3, (2, 5, 8))), TypeError, ["'h'", "int64"]),
        (dict(h=[1.0]), TypeError, ["'h'"]),
    ],
)
def test_bad_inputs_raise_before_launch(kwargs, exc, words):
    args = dict(h=torch.randn(2, 5, 8), neurons=[1, 3])
    args.update(kwargs)
    h, neurons = args.pop("h"), args.pop("neurons")
    with pytest.raises(exc) as info:
        ttr_activation(h, neurons, **args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_explain_lists_every_backend():
    reasons = dsr_kernels.explain("ttr_activation", "cpu")
    assert set(reasons) == {"cuda", "cpu", "triton", "reference"}
    assert reasons["reference"] == "available"
    assert "cuda" in reasons["cuda"]


@pytest.mark.parametrize(
    "backend",
    [pytest.param("cpu", marks=requires_extension), pytest.param("triton", marks=requires_interpreter)],
)
def test_opcheck(backend):
    op = (
        torch.ops.dsr_kernels.ttr_activation_fwd
        if backend == "cpu"
        else torch.ops.dsr_kernels.ttr_activation_fwd_triton
    )
    h = torch.randn(2, 11, 24, requires_grad=True)
    n = torch.tensor([3, 20, 7])
    torch.library.opcheck(op.default, (h, n, 1, 1, "zero", "signed_max", False))
    torch.library.opcheck(op.default, (h, n, 2, 0, "only_outliers", "layer_signed_max", True))
    torch.library.opcheck(op.default, (h, n[:0], 1, 0, "mean", "max", False))


@requires_extension
def test_torch_compile_fullgraph():
    class TinyMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
            self.register_buffer("neurons", torch.tensor([2, 9, 30]))

        def forward(self, x):
            from dsr_kernels.ops.ttr_activation import ttr_activation_op

            h = ttr_activation_op(
                self.fc1(x),
                self.neurons,
                num_registers=1,
                num_prefix_tokens=0,
                patch_values="zero",
                register_value="signed_max",
                approximate="none",
                backend="cpu",
            )
            return self.fc2(h)

    m = TinyMlp()
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x))
    compiled(x).sum().backward()
    assert m.fc1.weight.grad is not None


@requires_extension
@pytest.mark.parametrize(
    "neurons, words",
    [([3, 72, 5], ["neurons[1] = 72", "[0, F = 72)"]), ([3, -1], ["neurons[1] = -1"]), ([3, 5, 3], ["appears twice"])],
)
def test_compiled_op_checks_neurons_itself(neurons, words):
    """The compiled op, called directly, checks range and duplicates on the host before any launch."""
    h = torch.randn(2, 6, 72)
    with pytest.raises(RuntimeError) as info:
        torch.ops.dsr_kernels.ttr_activation_fwd(h, torch.tensor(neurons), 1, 1, "zero", "signed_max", False)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_cuda_op_checks_neurons_before_launch(where):
    """On CUDA tensors as on the CPU: [3, 72, -1, 5] with F = 72 raises (it used to be ignored)."""
    h = torch.randn(2, 6, 72, device="cuda")
    bad = torch.tensor([3, 72, -1, 5], device=where)
    with pytest.raises(RuntimeError, match="is not in"):
        torch.ops.dsr_kernels.ttr_activation_fwd(h, bad, 1, 1, "zero", "signed_max", False)
    with pytest.raises(ValueError, match="not a neuron index"):
        ttr_activation(h, bad, num_prefix_tokens=1)
    good = torch.tensor([3, 70, 5], device=where)  # host neurons with device h: copied, not synced
    torch.testing.assert_close(
        ttr_activation(h, good, num_prefix_tokens=1, backend="cuda"),
        ttr_activation_ref(h, good.cuda(), num_prefix_tokens=1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_device_neurons_are_read_back_once_per_version():
    """check_neurons keeps the validated host copy on a tensor and redoes it after an in-place change."""
    from dsr_kernels.ops.ttr_activation import check_neurons

    n = torch.tensor([1, 4], device="meta")  # (a device tensor that cannot be read: the cache must answer)
    n._dsr_checked_neurons = (n._version, 8, torch.tensor([1, 4]))
    assert check_neurons("f", n, 8).tolist() == [1, 4]
    with pytest.raises(NotImplementedError):
        check_neurons("f", n, 9)  # another width: checked again, which means reading the tensor back


@requires_extension
def test_register_neuron_gelu_hands_the_op_a_host_copy(monkeypatch):
    """RegisterNeuronGELU gives the fused op a CPU copy of its neurons (on a GPU: no read-back
    per forward, compiled or not), taken again after an in-place change."""
    from dsr_kernels.models import vit

    act = vit.RegisterNeuronGELU(backend="cpu")
    act.neurons, act.settings, act.num_prefix_tokens = torch.tensor([3, 9]), vit.TestTimeRegisterSettings(), 1
    seen = []
    op = vit.ttr_activation_op
    monkeypatch.setattr(vit, "ttr_activation_op", lambda h, n, **kw: seen.append(n) or op(h, n, **kw))
    h = torch.randn(2, 6, 16)
    kw = dict(num_prefix_tokens=1, patch_values="zero", register_value="signed_max")
    torch.testing.assert_close(act(h), ttr_activation_ref(h, torch.tensor([3, 9]), **kw))
    act.neurons[0] = 5  # in place: the copy follows
    torch.testing.assert_close(act(h), ttr_activation_ref(h, torch.tensor([5, 9]), **kw))
    act.neurons = torch.tensor([1])
    torch.testing.assert_close(act(h), ttr_activation_ref(h, torch.tensor([1]), **kw))
    assert all(n.device.type == "cpu" for n in seen) and seen[-1].tolist() == [1]
    compiled = torch.compile(act, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h), act(h))
