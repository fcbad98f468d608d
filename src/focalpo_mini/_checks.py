"""Argument checks shared by the public functions: each raises a message that names the argument."""

from __future__ import annotations

import math
import numbers

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def check_number(
    name: str, value: object, *, minimum: float, inclusive: bool = True, maximum: float = math.inf
) -> float:
    """Return ``value`` as a Python float if it is a finite real number in the allowed range.

    Any real number is accepted (``int``, ``float``, NumPy scalars such as ``np.float32``), but
    not ``bool`` or a string.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        value = math.inf if value > 0 else -math.inf
    low_ok = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and low_ok and value <= maximum):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        if maximum < math.inf:
            bound += f" and <= {maximum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_flag(name: str, value: object) -> bool:
    """Return ``value`` as a Python bool if it is ``True``/``False`` or a NumPy bool; numbers and
    strings such as ``1`` or ``"no"`` are refused."""
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_float_tensor(name: str, tensor: object, ndim: int | None = None) -> None:
    """A non-empty floating-point tensor, with ``ndim`` dimensions when given."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {tensor.layout}; "
            "call .to_dense() first"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(tensor.shape)}); expected at least one element"
        )


def check_same_shape(reference_name: str, reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                f"like {reference_name}"
            )


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf. The trainers catch it to skip a step instead of stopping."""


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors on one device; the message names the first one that is elsewhere."""
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device}, expected {first.device} like {first_name}"
            )


def check_finite(**tensors: torch.Tensor) -> None:
    """Reject NaN and inf (raising :class:`NonFiniteError`), with one host sync for all tensors
    together; the tensors must be on one device (see :func:`check_same_device`).

    A tensor is finite iff its minimum and maximum are (``aminmax`` propagates NaN). That is one
    pass with no temporary tensor, an order of magnitude cheaper than ``isfinite(t).all()``.
    """
    extremes = torch.stack([torch.stack(torch.aminmax(t)).double() for t in tensors.values()])
    finite = torch.isfinite(extremes).all(dim=1)
    if not bool(finite.all()):
        bad = [name for name, ok in zip(tensors, finite.tolist(), strict=True) if not ok]
        raise NonFiniteError(f"{', '.join(bad)} must be finite, found NaN or inf")


def check_pair_logps(**logps: torch.Tensor) -> torch.dtype:
    """The four (B,) log-prob tensors of a preference batch; returns their promoted dtype."""
    for name, tensor in logps.items():
        check_float_tensor(name, tensor, ndim=1)
    (first_name, first), *others = logps.items()
    check_same_shape(first_name, first, **dict(others))
    check_same_device(**logps)
    check_finite(**logps)
    dtype = first.dtype
    for _, tensor in others:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a computation runs in: float32 for half-precision inputs, else the input's."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as a Python int if it is an integer (``int`` or a NumPy integer, not
    ``bool``) of at least ``minimum`` (and at most ``maximum`` when given)."""
    bound = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {bound}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def first_parameter(name: str, model: object) -> torch.Tensor:
    """The first parameter of ``model`` (its device and dtype are the model's); TypeError for a
    non-module, ValueError for a module without parameters."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        raise ValueError(f"{name} ({type(model).__name__}) has no parameters")
    return parameter
