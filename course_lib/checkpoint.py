"""Atomic checkpoints that resume training exactly.

A checkpoint is one ``torch.save`` file holding the model, optimizer and scheduler state dicts,
the step, the training history, free-form ``extra`` data and the random-number-generator states
of Python ``random``, NumPy, torch CPU and CUDA. Restoring the RNG states is what makes a resumed
run draw the same dropout masks (and so produce the same losses) as an uninterrupted one.

Saving is atomic: the file is written to a temporary file in the same directory, flushed to
disk (``fsync``) and renamed over the target with ``os.replace``. A crash or a full disk during
the save leaves the previous checkpoint untouched, never a half-written one.

Files are read with ``torch.load(weights_only=True)``: only tensors and plain Python values
(numbers, strings, lists, tuples, dicts) are allowed in ``extra`` and ``history``, so loading a
checkpoint from somewhere else cannot run arbitrary code.
"""

from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT_NAME = "course_lib.checkpoint"
FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file exists but is corrupt, incomplete or not a course_lib checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled Python objects that ``weights_only`` loading refuses."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            isinstance(model, torch.nn.DataParallel)
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def get_rng_states() -> dict:
    """RNG states of Python ``random``, NumPy, torch CPU and (when available) all CUDA devices."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore the states returned by :func:`get_rng_states`."""
    random.setstate(states["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = states["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(states["torch"])
    cuda_states = states.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    step: int = 0,
    history=None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (parent folders are created) and return the path.

    ``history`` may be a ``course_lib.train.History`` (stored through its ``to_dict()``) or plain
    data. DDP / compiled wrappers are removed so the saved keys are those of the plain model.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": step,
        "history": history.to_dict() if hasattr(history, "to_dict") else history,
        "extra": extra or {},
        "rng": get_rng_states(),
    }
    _atomic_torch_save(state, path)
    return path


def _atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that saves of ``path`` killed mid-write left beside it; return them.

    Only for a run that owns ``path`` (a resumed or an overwriting run): a save in progress in
    another process would lose its temp file.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict:
    """Load ``path`` into ``model`` (and ``optimizer`` / ``scheduler`` when given).

    Returns ``{"step": int, "history": dict | None, "extra": dict}``.
    Raises ``FileNotFoundError`` if ``path`` does not exist, :class:`CheckpointError` if it is
    corrupt, truncated or not a course_lib checkpoint, :class:`UnsafeCheckpointError` (a
    ``CheckpointError``) if it holds pickled objects that ``weights_only`` loading refuses, and
    ``ValueError`` listing a few missing / unexpected / mis-shaped keys if the model does not
    match the saved weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _read_checkpoint(path)
    target = unwrap_model(model)
    model_state = _strip_wrapper_prefixes(state["model"])
    _check_keys_match(path, target.state_dict(), model_state)
    target.load_state_dict(model_state)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state; pass optimizer=None")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"checkpoint {path} holds no scheduler state; pass scheduler=None")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_states(state["rng"])
    return {"step": state["step"], "history": state["history"], "extra": state["extra"]}


def _refused_global(error: BaseException) -> str | None:
    """The Python object ``weights_only`` loading refused to unpickle, or ``None`` for another failure.

    torch words it "Unsupported global: GLOBAL builtins.print was not an allowed global" or, for a
    module on its block list, "unsupported GLOBAL posix.system whose module posix is blocked".
    """
    match = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?(\S+)", str(error), flags=re.IGNORECASE)
    return match.group(1) if match else None


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises OSError, EOFError, RuntimeError, UnpicklingError...
        refused = _refused_global(error)
        if refused is not None:
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds Python objects that weights_only loading does not allow "
                f"(the first one: {refused}); course_lib reads only tensors and plain values, because "
                "unpickling other objects can run arbitrary code. The file is not damaged: if you trust "
                "where it came from, inspect it with torch.load(path, weights_only=False); otherwise "
                "do not load it"
            ) from error
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete (torch.load failed: "
            f"{type(error).__name__}); delete it or resume from an earlier copy"
        ) from error
    required = ("model", "optimizer", "scheduler", "step", "history", "extra", "rng")
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME or any(k not in state for k in required):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete: it is a torch file but not a "
            f"course_lib checkpoint (expected a dict with format={FORMAT_NAME!r} and keys {list(required)})"
        )
    return state


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Drop ``module.`` / ``_orig_mod.`` prefixes left by checkpoints saved from wrapped models."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def _check_keys_match(path: Path, expected: dict, found: dict, shown: int = 5) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [
        f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(found[k].shape)}"
        for k in expected
        if k in found and expected[k].shape != found[k].shape
    ]
    if not (missing or unexpected or mis_shaped):
        return

    def few(items):
        more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
        return f"{items[:shown]}{more}"

    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {few(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches: {few(mis_shaped)}")
    raise ValueError(f"checkpoint {path} does not match model: " + "; ".join(problems))
