"""The library's contract under any input (README, "What every function promises"), as code the
property tests share: generated arguments, valid and not, and the check of one call.

A call under the contract either returns, with no NaN or inf it does not document, or raises
TypeError or ValueError (NonFiniteError is a ValueError) whose message names the argument that
was wrong. Any other exception type fails the test, and so does a documented error that names
none of the arguments.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from hypothesis import strategies as st

DOCUMENTED = (TypeError, ValueError)
RAISED = object()  # what call() returns when the function refused its arguments

TALLY: Counter = Counter()
"""Calls made under the contract, by outcome: "result" (returned, checked) or "clear" (refused
with a documented error naming the argument). Printed at the end of the session."""


def call(fn, names, /, *args, **kwargs):
    """``fn(*args, **kwargs)``: its result, or RAISED if it raised a documented error whose
    message names one of ``names``. Any other failure propagates, so the test fails."""
    try:
        result = fn(*args, **kwargs)
    except DOCUMENTED as error:
        text = str(error)
        assert any(name in text for name in names), (
            f"{fn.__qualname__} raised {type(error).__name__} naming none of {list(names)}: {text}"
        )
        TALLY["clear"] += 1
        return RAISED
    TALLY["result"] += 1
    return result


def assert_finite(value, where: str = "result") -> None:
    """No NaN or inf anywhere in ``value`` (a number, tensor, or a dict/list/tuple of them)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            assert bool(torch.isfinite(value).all()), f"{where} holds NaN or inf: {value}"
    elif isinstance(value, (float, np.floating)):
        assert math.isfinite(value), f"{where} is {value}"
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_finite(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_finite(item, f"{where}[{i}]")


# --- Arguments --------------------------------------------------------------------------------

NUMPY_SCALARS = st.sampled_from(
    [
        np.float32(0.5),
        np.float64(2.0),
        np.float16(0.25),
        np.int64(3),
        np.int32(0),
        np.int8(-1),
        np.uint8(7),
        np.bool_(True),
        np.str_("dpo"),
        np.float32("nan"),
        np.float64("inf"),
    ]
)

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def any_tensor(draw) -> torch.Tensor:
    """A tensor of any common dtype and a small shape, empty included, NaN and inf included."""
    shape = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3), (2, 0)]))
    dtype = draw(
        st.sampled_from(
            [
                torch.float32,
                torch.float64,
                torch.float16,
                torch.bfloat16,
                torch.int64,
                torch.bool,
                torch.complex64,
            ]
        )
    )
    n = math.prod(shape)
    values = draw(st.lists(ANY_FLOAT, min_size=n, max_size=n))
    base = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype == torch.bool:
        return base.nan_to_num(0.0) > 0
    if dtype == torch.int64:
        return base.nan_to_num(0.0, 0.0, 0.0).clamp(-(2**40), 2**40).to(dtype)
    return base.to(dtype)


SPARSE = st.builds(lambda: torch.tensor([0.0, -1.0, 0.0]).to_sparse())

ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    ANY_FLOAT,
    st.complex_numbers(max_magnitude=1e3),
    st.text(max_size=6),
    st.binary(max_size=4),
    NUMPY_SCALARS,
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    any_tensor(),
    SPARSE,
    st.builds(object),
)
"""Anything a careless or adversarial caller might pass: types, NumPy scalars, NaN and inf,
huge integers, unicode, empty and sparse tensors."""


def logps(n: int, dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    """Summed log-probs, shape (n,), in [-300, 0] (bfloat16: [-40, 0], so beta * h stays small)."""

    @st.composite
    def build(draw) -> torch.Tensor:
        dtype = draw(st.sampled_from(dtypes))
        low = -40.0 if dtype in (torch.float16, torch.bfloat16) else -300.0
        values = draw(st.lists(st.floats(low, 0.0), min_size=n, max_size=n))
        return torch.tensor(values, dtype=dtype)

    return build()


BETA = st.one_of(st.floats(1e-3, 10.0), st.sampled_from([np.float32(0.1), np.float64(1.0), 2]))
GAMMA = st.one_of(st.floats(0.0, 5.0), st.sampled_from([np.float32(0.5), 0, 1]))
FLAG = st.one_of(st.booleans(), st.just(np.bool_(False)))
REDUCTION = st.sampled_from(["mean", "sum", "none"])


def expected_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The documented result dtype: the promoted input dtype, float32 for half precision."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
