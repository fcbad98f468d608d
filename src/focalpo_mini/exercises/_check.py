"""The two outcomes of a checker: one success line, or an AssertionError with a precise hint."""

from __future__ import annotations

from typing import NoReturn


def passed(name: str) -> None:
    """Print the single success line for exercise ``name``."""
    print(f"✓ {name}: correct.")


def failed(name: str, case: str, expected: object, got: object, hint: str) -> NoReturn:
    """Raise the AssertionError a reader sees when exercise ``name`` fails on input ``case``."""
    raise AssertionError(
        f"✗ {name} failed on {case}\n    expected: {expected}\n    got:      {got}\n"
        f"    hint: {hint}"
    )
