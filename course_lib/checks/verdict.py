"""The verdict helpers every check function uses."""

from __future__ import annotations

import torch


class ExerciseError(AssertionError):
    """Raised by a check function: the message tells the learner what to fix."""


def expect(condition: bool, check: str, message: str) -> None:
    """Fail ``check`` with ``message`` unless ``condition``."""
    if not condition:
        raise ExerciseError(f"{check}: not yet. {message}")


def expect_close(actual, expected, check: str, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail ``check`` unless tensors ``actual`` and ``expected`` have the same shape and values."""
    if not isinstance(actual, torch.Tensor):
        raise ExerciseError(f"{check}: not yet. {what} should be a torch.Tensor, got {type(actual).__name__}")
    expect(tuple(actual.shape) == tuple(expected.shape), check,
           f"{what} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol):
        diff = (actual.float() - expected.float()).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise ExerciseError(
            f"{check}: not yet. {what} differs from the expected values: largest difference "
            f"{diff.max().item():.3g} at index {where} (got {actual.flatten()[diff.argmax()].item():.4g}, "
            f"expected {expected.flatten()[diff.argmax()].item():.4g})"
        )


def check_callable(name: str, fn) -> None:
    """A clear error when ``fn``, passed to the check ``name``, is not the learner's function."""
    if not callable(fn):
        raise ValueError(f"{name} must be the function you wrote (a callable), got {type(fn).__name__}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str, tuple)):
        return repr(value)
    return type(value).__name__


def call_learner(check: str, fn, *args, **kwargs):
    """Call the learner's ``fn``; any exception becomes an ``ExerciseError`` that names the function,
    the error and the inputs (the original traceback stays chained)."""
    name = getattr(fn, "__name__", "your function")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise ExerciseError(f"{check}: not yet. {name} still raises NotImplementedError: "
                            "replace it with your code") from e
    except Exception as e:  # the learner's bug: report it, keep the traceback
        inputs = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(a)}" for k, a in kwargs.items()])
        raise ExerciseError(f"{check}: not yet. {name} raised {type(e).__name__}: {e} "
                            f"(called with {inputs})") from e


def passed(check: str, detail: str) -> None:
    print(f"PASS {check}: {detail}")
