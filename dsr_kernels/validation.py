"""Argument checks shared by every op (run before any launch).

Each raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (shape,
device, range) whose message names the function, the argument, what was expected and
what was seen: ``attention(): argument 'k' must have q's dtype torch.bfloat16, got
torch.float32``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_device",
    "check_dim",
    "check_dtype",
    "check_floating",
    "check_int",
    "check_tensor",
    "floating_dtypes",
    "is_int",
    "last_dim_contiguous",
    "shape_str",
]


def shape_str(t: Tensor) -> str:
    """``[2, 3, 4]`` for a tensor of that shape (the form every message uses)."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(fn: str, name: str, t: object, *, optional: bool = False) -> Tensor | None:
    """``t`` itself when it is a tensor (or None with ``optional``), else a TypeError."""
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{fn}(): argument '{name}' must be {what}, got {type(t).__name__}")
    return t


def check_dtype(fn: str, name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    """``t`` must have the dtype of ``like`` (the op's first tensor, named ``like_name``)."""
    if t.dtype != like.dtype:
        raise TypeError(f"{fn}(): argument '{name}' must have {like_name}'s dtype {like.dtype}, got {t.dtype}")


def check_device(fn: str, name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    """``t`` must be on the device of ``like``."""
    if t.device != like.device:
        raise ValueError(f"{fn}(): argument '{name}' is on {t.device} but {like_name} is on {like.device}")


def last_dim_contiguous(t: Tensor) -> Tensor:
    """``t``, copied only when its last dim is strided (the kernels read rows in place)."""
    return t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t


def floating_dtypes(*, float64: bool) -> tuple[torch.dtype, ...]:
    """The dtypes an op takes: the kernels' three, and float64 where the reference runs."""
    base = (torch.float16, torch.bfloat16, torch.float32)
    return (*base, torch.float64) if float64 else base


def check_dim(fn: str, name: str, t: Tensor, dim: int, layout: str) -> None:
    """``t`` must have ``dim`` dims, ``layout`` naming them (``"[B, N, D]"``)."""
    if t.dim() != dim:
        raise ValueError(f"{fn}(): argument '{name}' must be {dim}-D {layout}, got shape {shape_str(t)}")


def check_floating(fn: str, name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """``t``'s dtype must be one of ``dtypes`` (the message lists them: "float16, bfloat16 or float32")."""
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        listed = " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
        raise TypeError(f"{fn}(): argument '{name}' must be {listed}, got {t.dtype}")


def is_int(v: object) -> bool:
    """A Python int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(fn: str, name: str, v: object, minimum: int) -> None:
    """``v`` must be an int (not a bool) >= ``minimum``."""
    if not is_int(v) or v < minimum:
        raise ValueError(f"{fn}(): argument '{name}' must be an int >= {minimum}, got {v!r}")


def check_choice(fn: str, name: str, value: object, allowed: tuple) -> None:
    """``value`` must be one of ``allowed`` (an option given as a string)."""
    if value not in allowed:
        raise ValueError(f"{fn}(): argument '{name}' must be one of {allowed}, got {value!r}")
