"""Test-time registers for ViT encoders (the encoder stage of Dual-Stage Registers).

Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need Trained Registers"
(2025): a few "register neurons" in the MLPs create the high-norm outlier tokens. Find
them on a few calibration images, then at inference move their activation out of the
patches into one extra, untrained token (the test-time register). DSR applies this
recursively on SigLIP2-So400M, where a second population of outliers appears once the
first is removed.

    from dsr_kernels.registers import find_register_neurons_recursive, apply_test_time_registers

    found = find_register_neurons_recursive(encoder, images, threshold=30.0, top_k=10, depth=2)
    handle = apply_test_time_registers(encoder, found.neurons)  # fused into the MLP activation
    tokens = encoder.forward_features(images)                   # the register is dropped at the output
    handle.remove()

- :func:`find_register_neurons`, :func:`find_register_neurons_recursive`: discovery.
- :func:`apply_test_time_registers`: the fused redirection (``dsr_kernels.ttr_activation``
  in every selected layer's MLP), removable.
- :func:`apply_test_time_registers_with_hooks`: the released implementation's way (Python
  forward hooks editing the activation in several passes), the latency baseline.
- :func:`apply_outlier_key_mask`: the masking baseline (no key attends a token whose
  norm exceeds a threshold).
- In :mod:`dsr_kernels.registers.apply`, the pieces these are built of:
  :func:`~dsr_kernels.registers.apply.check_model` and
  :func:`~dsr_kernels.registers.apply.check_settings` (argument checks naming the caller),
  :func:`~dsr_kernels.registers.apply.released_hook` (the released forward hook).
"""

from dsr_kernels.registers.apply import (
    Handle,
    apply_outlier_key_mask,
    apply_test_time_registers,
    apply_test_time_registers_with_hooks,
)
from dsr_kernels.registers.discovery import (
    RecursiveRegisterNeurons,
    RegisterNeurons,
    find_register_neurons,
    find_register_neurons_recursive,
)

__all__ = [
    "Handle",
    "RecursiveRegisterNeurons",
    "RegisterNeurons",
    "apply_outlier_key_mask",
    "apply_test_time_registers",
    "apply_test_time_registers_with_hooks",
    "find_register_neurons",
    "find_register_neurons_recursive",
]
