"""What every checker shares: calling the reader's function safely, reading its answer, and the
two outcomes (one success line, or an AssertionError with a precise hint).

The reader's function gets fresh copies of the test tensors on every call, so an in-place operation
in one attempt cannot change a later check; a function that changes its inputs is told so. An
answer that is not what was asked for (``None``, a string, a dict, a tuple, a generator) gets a hint
that names what came back. A tensor on another device is moved to the CPU; one in bfloat16 or
float16 is compared at that dtype's precision, so that a right formula computed in low precision
gets a precision hint rather than a formula hint. A complex answer is refused (never read as its
real part). A function that does not return within ``TIME_LIMIT_S`` seconds is stopped, with a
hint (in the main thread, where Python delivers the timer signal that stops it; elsewhere, as in
a worker thread, it is not timed).
"""

from __future__ import annotations

import inspect
import signal
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

NONE_HINT = "your function returned None: did you forget `return`?"

TIME_LIMIT_S = 10.0
"""How long one call of the reader's function may take before the checker stops it."""

COMPLEX_HINT = (
    "your answer is complex: return real numbers. A complex value comes from a complex input "
    "you created (1j, torch.complex) or from a real power or root of a negative number "
    "(x ** 0.5 with x < 0 in NumPy/complex arithmetic); the imaginary part is never dropped."
)


def passed(name: str) -> None:
    """Print the single success line for exercise ``name``."""
    print(f"✓ {name}: correct.")


def failed(name: str, case: str, expected: object, got: object, hint: str) -> NoReturn:
    """Raise the AssertionError a reader sees when exercise ``name`` fails on input ``case``."""
    raise AssertionError(
        f"✗ {name} failed on {case}\n    expected: {expected}\n    got:      {got}\n"
        f"    hint: {hint}"
    )


def fresh(value: Any) -> Any:
    """A copy of ``value`` if it is a tensor (or a tuple of them), else ``value`` itself.

    A tensor that requires grad is a leaf made for this one call (to read the reader's gradient
    with respect to it), so it is passed as it is.
    """
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else value.detach().clone()
    if isinstance(value, tuple):
        return tuple(fresh(v) for v in value)
    return value


def describe(raw: Any) -> str:
    """A short description of what the reader's function returned, for the ``got:`` line."""
    if isinstance(raw, torch.Tensor):
        return f"tensor of shape {tuple(raw.shape)}, dtype {raw.dtype}, device {raw.device}"
    if isinstance(raw, (tuple, list)):
        return f"{type(raw).__name__} of {len(raw)} values"
    if isinstance(raw, dict):
        return f"dict with keys {list(raw)[:5]}"
    if isinstance(raw, str):
        return f"str {raw[:40]!r}"
    return type(raw).__name__ if raw is not None else "None"


def type_hint(raw: Any, want: str) -> str | None:
    """The hint for an answer that is not the kind asked for (``want``), or None if it is.

    ``want`` is ``"a tensor"`` or ``"a float"``; numbers, numpy values and tensors pass here (their
    shape and dtype are checked later).
    """
    if raw is None:
        return NONE_HINT
    if isinstance(raw, types.GeneratorType):
        return (
            f"your function returned a generator (a comprehension in round brackets, or "
            f"`yield`): return {want}, computed on the whole input at once."
        )
    if isinstance(raw, (str, bytes)):
        return f"your function returned a {type(raw).__name__}: return {want}, not text."
    if isinstance(raw, complex):
        return COMPLEX_HINT
    if isinstance(raw, dict):
        return f"your function returned a {describe(raw)}: return only {want}."
    if isinstance(raw, (tuple, list)):
        return (
            f"your function returned a {type(raw).__name__} of {len(raw)} values: return one "
            f"value, {want}"
            + (" (torch.stack the pieces, or compute on the whole tensor)." if raw else ".")
        )
    if isinstance(raw, (bool, int, float, torch.Tensor)) or type(raw).__module__ == "numpy":
        return None
    return f"your function returned an object of type {type(raw).__name__}: return {want}."


def to_cpu(name: str, case: str, expected: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached and on the CPU; a device that holds no values gets a clear failure."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor
    try:
        return tensor.cpu()
    except (NotImplementedError, RuntimeError):
        failed(
            name,
            case,
            expected,
            describe(tensor),
            f"your tensor is on the '{tensor.device.type}' device and its values cannot be read "
            "back: compute on the CPU, where the inputs are (or return `.cpu()` of the result).",
        )


def read_tensor(name: str, case: str, expected: str, raw: Any) -> tuple[torch.Tensor, torch.dtype]:
    """The reader's answer as a float64 CPU tensor, and the dtype it was computed in."""
    hint = type_hint(raw, "a tensor")
    if hint is not None:
        failed(name, case, expected, describe(raw), hint)
    tensor = real_tensor(name, case, expected, raw, "return a tensor of numbers.")
    tensor = to_cpu(name, case, expected, tensor)
    return tensor.to(torch.float64), tensor.dtype


def read_float(name: str, case: str, expected: str, raw: Any) -> tuple[torch.Tensor, torch.dtype]:
    """The reader's answer as a 0-dim float64 tensor, and its dtype; it must be one number."""
    hint = type_hint(raw, "a float")
    if hint is not None:
        failed(name, case, expected, describe(raw), hint)
    tensor = real_tensor(name, case, expected, raw, "return one float.")
    if tensor.numel() != 1:
        failed(
            name,
            case,
            expected,
            describe(tensor),
            f"return one float, not {tensor.numel()} values of shape {tuple(tensor.shape)}.",
        )
    tensor = to_cpu(name, case, expected, tensor)
    return tensor.reshape(()).to(torch.float64), tensor.dtype


def real_tensor(name: str, case: str, expected: str, raw: Any, hint: str) -> torch.Tensor:
    """``raw`` as a real tensor, or a failure: ``hint`` when it holds no numbers, the complex
    hint when it is complex."""
    try:
        tensor = _number_as_tensor(raw)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        failed(name, case, expected, describe(raw), hint)
    if tensor.is_complex():
        failed(name, case, expected, describe(tensor), COMPLEX_HINT)
    if tensor.layout != torch.strided:
        failed(name, case, expected, describe(tensor), "return a dense tensor (.to_dense()).")
    return tensor


def _number_as_tensor(raw: Any) -> torch.Tensor:
    """``raw`` as a tensor; a Python number becomes float64 (as_tensor would make it float32)."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return torch.tensor(float(raw), dtype=torch.float64)
    return torch.as_tensor(raw)


def precision_hint(dtype: torch.dtype) -> str:
    """The hint for an answer right only to the precision of a low-precision ``dtype``."""
    return (
        f"your values are right to {dtype}'s precision, but {dtype} keeps only about "
        f"{3 if dtype == torch.bfloat16 else 4} significant digits: compute in float64, the "
        "inputs' dtype (no .bfloat16() or .half(); check the dtype of any tensor you create)."
    )


def low_precision_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` equals ``expected`` to the precision of ``dtype`` (a low-precision one)."""
    eps = torch.finfo(dtype).eps
    return got.shape == expected.shape and bool(
        torch.allclose(got, expected, rtol=4 * eps, atol=4 * eps, equal_nan=True)
    )


def call(name: str, case: str, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """Call ``fn`` on fresh copies of ``args``; fail if it raises or changes an input in place."""
    given = [fresh(a) for a in args]
    try:
        with _time_limit(TIME_LIMIT_S):
            raw = fn(*given, **kwargs)
    except _TimeUp:
        failed(
            name,
            case,
            expected,
            f"no answer after {TIME_LIMIT_S:g} s",
            f"your function did not return within {TIME_LIMIT_S:g} s, so the checker stopped "
            "it: look for a loop that never ends (a `while` whose condition never changes) or "
            "a loop over far more values than the input holds.",
        )
    except Exception as error:  # the reader's bug, reported with the input that triggered it
        failed(
            name,
            case,
            expected,
            f"{type(error).__name__}: {error}",
            "your function raised an error on this input; the message above says where.",
        )
    for index, (before, after) in enumerate(zip(args, given, strict=True)):
        if isinstance(before, torch.Tensor) and not _unchanged(before, after):
            failed(
                name,
                case,
                expected,
                f"argument {_argument_name(fn, index)} changed from {_brief(before)} to "
                f"{_brief(after)}",
                "your function changed its input tensor in place (x.clamp_(...), x += ..., "
                "x[...] = ..., an out= argument): the caller's tensors must stay as they were. "
                "Work on a copy, e.g. x = x.clamp(...).",
            )
    return raw


class _TimeUp(BaseException):
    """Raised into the reader's function by the timer; a BaseException, so that the reader's
    own ``except Exception`` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_TimeUp` in the code run inside, once ``seconds`` have passed (a real-time
    timer; main thread only, where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def stop(signum, frame) -> None:
        raise _TimeUp

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _unchanged(before: torch.Tensor, after: torch.Tensor) -> bool:
    after = after.detach()
    same_kind = (after.shape, after.dtype, after.device) == (
        before.shape,
        before.dtype,
        before.device,
    )
    return same_kind and bool(torch.equal(before.detach(), after))


def _argument_name(fn: Callable[..., Any], index: int) -> str:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    return f"`{params[index]}`" if index < len(params) else f"{index + 1}"


def _brief(tensor: torch.Tensor) -> str:
    values = tensor.detach().flatten()[:6].tolist()
    shown = [round(v, 4) if isinstance(v, float) else v for v in values]
    return str(shown) + (" ..." if tensor.numel() > 6 else "")
