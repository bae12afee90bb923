"""The verdict every check function gives: ``PASS``, ``not yet`` or ``wrong``.

A check raises :class:`ExerciseError` with one of two verdicts:

- ``"<check>: not yet: fill in <function> ..."``: the learner's function is still the starter (it
  raises ``NotImplementedError``, or returns ``None`` / ``...`` because its body is empty);
- ``"<check>: wrong: <what is wrong, on which input, and a hint>"``: it runs but gives a wrong answer,
  or raises an error of its own.

In IPython and Jupyter the verdict is shown as its message alone: the check's own frames are never
shown (their source computes the expected answer), only, when the learner's function raised, the
frames of the learner's own code. Under pytest or a plain script it is an ordinary exception with its
full traceback, so a wrong solution fails the test suite with everything a developer needs.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

NOT_YET, WRONG = "not yet", "wrong"
_CHECKS_DIR = str(Path(__file__).resolve().parent)
_RED, _RESET = "\x1b[31m", "\x1b[39m"  # what IPython's own tracebacks use for the exception name


class ExerciseError(AssertionError):
    """A check's verdict on an exercise: ``verdict`` is ``"not yet"`` or ``"wrong"``, ``check`` the
    check's name, ``detail`` what to do; ``str(error)`` is ``"<check>: <verdict>: <detail>"``.

    IPython calls ``_render_traceback_`` to display it (ipykernel sends those lines as the error
    output's ``traceback``; its ``ename`` is ``"ExerciseError"`` and its ``evalue`` the message).
    """

    def __init__(self, check: str, verdict: str, detail: str):
        if verdict not in (NOT_YET, WRONG):
            raise ValueError(f"verdict must be {NOT_YET!r} or {WRONG!r}, got {verdict!r}")
        self.check, self.verdict, self.detail = check, verdict, detail
        super().__init__(f"{check}: {verdict}: {detail}")

    def __reduce__(self):  # picklable although __init__ takes three arguments
        return type(self), (self.check, self.verdict, self.detail)

    def _render_traceback_(self) -> list[str]:
        """The lines IPython shows instead of a traceback: the verdict, and where in the learner's
        own code the error was raised when their function raised one."""
        lines = [f"{_RED}{type(self).__name__}{_RESET}: {self}"]
        cause = self.__cause__
        if self.verdict == WRONG and cause is not None and cause.__traceback__ is not None:
            frames = [f for f in traceback.extract_tb(cause.__traceback__)
                      if not str(Path(f.filename).resolve()).startswith(_CHECKS_DIR)]
            if frames:
                lines.append("Where in your code:")
                for f in frames:
                    lines.append(f"  {_where(f.filename)}, line {f.lineno}, in {f.name}")
                    if f.line:
                        lines.append(f"    {f.line.strip()}")
                lines.append(f"{type(cause).__name__}: {cause}")
        return lines


def _where(filename: str) -> str:
    """``"Cell In[3]"`` for code typed in a notebook cell (as IPython names it), else ``File "..."``."""
    try:
        from IPython import get_ipython

        number = get_ipython().compile._filename_map[filename]
        return f"Cell In[{number}]"
    except Exception:  # noqa: BLE001 - not in IPython, or a file: name the file
        return f'File "{filename}"'


class CheckArgumentError(ExerciseError, ValueError):
    """A check was called with something other than the learner's function (a ``ValueError`` too)."""

    def __init__(self, check: str, detail: str, verdict: str = WRONG):
        super().__init__(check, verdict, detail)

    def __reduce__(self):
        return type(self), (self.check, self.detail, self.verdict)


def wrong(check: str, detail: str) -> ExerciseError:
    """The ``wrong`` verdict of ``check`` (raise it)."""
    return ExerciseError(check, WRONG, detail)


def not_yet(check: str, detail: str) -> ExerciseError:
    """The ``not yet`` verdict of ``check`` (raise it)."""
    return ExerciseError(check, NOT_YET, detail)


def expect(condition: bool, check: str, message: str) -> None:
    """Fail ``check`` with the ``wrong`` verdict ``message`` unless ``condition``."""
    if not condition:
        raise wrong(check, message)


def expect_close(actual, expected, check: str, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail ``check`` unless tensors ``actual`` and ``expected`` have the same shape and values."""
    if not isinstance(actual, torch.Tensor):
        raise wrong(check, f"{what} should be a torch.Tensor, got {type(actual).__name__}")
    expect(tuple(actual.shape) == tuple(expected.shape), check,
           f"{what} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not torch.allclose(actual.detach().float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False):
        diff = (actual.detach().float() - expected.float()).abs().nan_to_num(float("inf"))
        k = int(diff.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), diff.shape))
        raise wrong(check,
                    f"{what} differs from the expected values: largest difference {diff.max().item():.3g} at "
                    f"index {where} (got {actual.flatten()[k].item():.4g}, expected {expected.flatten()[k].item():.4g})")


def as_number(check: str, value, what: str) -> float:
    """``value`` (a Python number or a one-element tensor) as a float, or the ``wrong`` verdict."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
    raise wrong(check, f"{what} should be one number (a float), got {type(value).__name__}{shape}")


def check_callable(name: str, fn, check: str = "check") -> None:
    """A clear error when ``fn``, passed as the argument ``name`` of ``check``, is not a function."""
    if not callable(fn):
        hint = " (pass the function itself, without calling it: no parentheses)" if fn is not None else ""
        raise CheckArgumentError(check, f"{name} must be the function you wrote (a callable), "
                                        f"got {type(fn).__name__}{hint}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str, tuple)):
        return repr(value)
    return type(value).__name__


def call_learner(check: str, fn, *args, **kwargs):
    """Call the learner's ``fn`` and return its result, or raise the verdict:

    - ``not yet`` when ``fn`` raises ``NotImplementedError`` or returns ``None`` / ``...`` (a starter);
    - ``wrong`` when it raises any other exception (named, with the inputs; its traceback is chained,
      and IPython shows the learner's frames of it).
    """
    name = getattr(fn, "__name__", "your function")
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError as e:
        note = f" ({e})" if str(e) else ""
        raise not_yet(check, f"fill in {name}: it still raises NotImplementedError{note}; "
                             "replace that line with your code") from e
    except ExerciseError:
        raise
    except Exception as e:  # the learner's bug: report it, keep the traceback
        inputs = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(a)}" for k, a in kwargs.items()])
        raise wrong(check, f"{name} raised {type(e).__name__}: {e} (called with {inputs})") from e
    if result is None or result is Ellipsis:
        raise not_yet(check, f"fill in {name}: it returned {result!r} (its body is still `...`, or it has "
                             "no `return`); write its code and return the result")
    return result


def passed(check: str, detail: str) -> None:
    print(f"PASS {check}: {detail}")
