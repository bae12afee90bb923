"""The training loop every notebook (and ``course_lib.pretrain``) uses.

Plain, in the style of nanoGPT's ``train.py``: AdamW with decoupled weight decay on matrices only,
linear warmup then cosine decay, gradient accumulation, gradient clipping, bf16 autocast on GPUs,
optional ``torch.compile``, and atomic checkpoints that resume bit-for-bit.

    history = train(model, data, TrainConfig(steps=300, lr=1e-3))
    history.losses[-1], history.mean_last(20)

``model(batch)`` (or ``loss_fn(model, batch)``) returns the loss, or a dict with a ``"loss"``
entry and any other scalar entries (accuracies, sub-losses) that are logged beside it.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from course_lib.utils import get_device, seed_everything


@dataclass
class TrainConfig:
    """Everything the loop needs; every field is validated on construction.

    steps: optimizer steps to run (in total, counting steps done before a resume).
    lr, weight_decay, betas: AdamW (decay is applied to parameters with 2+ dimensions only).
    warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
    grad_clip: max global gradient norm; ``None`` or 0 turns clipping off.
    accumulation_steps: micro-batches per optimizer step (each micro-batch loss is divided by it).
    bf16: ``"auto"`` (bf16 autocast on CUDA only), ``True`` (always) or ``False`` (never).
    compile: wrap the model in ``torch.compile``.
    device: ``None`` picks ``course_lib.utils.get_device()``.
    log_every: progress-bar refresh (or, with ``progress=False``, printed line) every N steps; 0 = silent.
    checkpoint_path, checkpoint_every: save atomically every N steps and at the end (0 = never).
    seed: seeds Python, NumPy and torch at the start of a fresh run.
    progress: show a ``tqdm.auto`` progress bar.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accumulation_steps: int = 1
    bf16: bool | str = "auto"
    compile: bool = False
    device: str | torch.device | None = None
    log_every: int = 10
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        _check_int("steps", self.steps, minimum=1)
        _check_number("lr", self.lr, minimum=0.0, strict=True)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        if not (
            isinstance(self.betas, (tuple, list))
            and len(self.betas) == 2
            and all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps={self.steps}")
        _check_number("min_lr_ratio", self.min_lr_ratio, minimum=0.0, maximum=1.0)
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, minimum=0.0)
        _check_int("accumulation_steps", self.accumulation_steps, minimum=1)
        if not (self.bf16 == "auto" or isinstance(self.bf16, bool)):
            raise ValueError(f"bf16 must be 'auto', True or False, got {self.bf16!r}")
        _check_bool("compile", self.compile)
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be None, a str or a torch.device, got {self.device!r}")
        _check_int("log_every", self.log_every, minimum=0)
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, (str, os.PathLike)):
            raise ValueError(f"checkpoint_path must be None or a path, got {self.checkpoint_path!r}")
        _check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        if self.checkpoint_every > 0 and self.checkpoint_path is None:
            raise ValueError("checkpoint_every > 0 needs checkpoint_path (where to save)")
        _check_int("seed", self.seed, minimum=0)
        _check_bool("progress", self.progress)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value, minimum=None, maximum=None, strict=False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the range."""
    ok = _is_number(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        low = "" if minimum is None else f"{'>' if strict else '>='} {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be a finite number {' and '.join(filter(None, [low, high]))}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """One record (dict) per optimizer step: ``step``, ``loss``, ``lr`` and any other logged scalars."""

    records: list[dict] = field(default_factory=list)

    def append(self, record: dict) -> None:
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def values(self, key: str = "loss") -> list[float]:
        """All logged values of ``key``, in step order (steps that did not log it are skipped)."""
        return [r[key] for r in self.records if key in r]

    @property
    def losses(self) -> list[float]:
        return self.values("loss")

    @property
    def steps(self) -> list[int]:
        return self.values("step")

    def last(self, key: str = "loss") -> float:
        """The most recent value of ``key``."""
        values = self._nonempty(key)
        return values[-1]

    def mean_last(self, n: int, key: str = "loss") -> float:
        """Mean of the last ``n`` values of ``key`` (fewer if fewer were logged)."""
        _check_int("n", n, minimum=1)
        values = self._nonempty(key)[-n:]
        return sum(values) / len(values)

    def _nonempty(self, key: str) -> list:
        values = self.values(key)
        if not values:
            known = sorted({k for r in self.records for k in r})
            raise ValueError(f"key={key!r} was never logged; logged keys are {known}")
        return values

    def to_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict | None) -> "History":
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or not isinstance(data.get("records"), list):
            raise ValueError(f"data must be a dict with a 'records' list (from History.to_dict), got {data!r}")
        return cls([dict(r) for r in data["records"]])


# --------------------------------------------------------------------------- optimizer + schedule


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay, as a multiplier of each group's base lr.

    For the lr used at step ``s`` (0-based), with W = warmup_steps, T = total_steps, m = min_lr_ratio:

        factor(s) = (s + 1) / W                                      if s < W
        factor(s) = m + (1 - m) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))   otherwise (capped at s = T)

    The first step already trains (no zero-lr step); the multiplier reaches ``m`` at s = T, one
    past the last step. Call ``scheduler.step()`` once after every ``optimizer.step()``.
    """
    _check_int("warmup_steps", warmup_steps, minimum=0)
    _check_int("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={total_steps}")
    _check_number("min_lr_ratio", min_lr_ratio, minimum=0.0, maximum=1.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices / embeddings (2+ dims) only.

    Biases and LayerNorm / BatchNorm scales (1-d) are not decayed, as in nanoGPT and BERT.
    Uses the fused CUDA kernel when every parameter lives on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)


# --------------------------------------------------------------------------- batches


def move_to_device(batch, device: torch.device):
    """Move every tensor inside ``batch`` (nested dict / list / tuple / namedtuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _batch_stream(data, start_micro: int):
    """Yield micro-batches from ``start_micro`` on.

    A callable is called with the micro-batch index (the step, when accumulation_steps=1). An
    iterable is re-iterated whenever it runs out; on resume the consumed batches are skipped by
    iterating over them (exact for lists and unshuffled loaders; a shuffled DataLoader draws its
    order from the RNG at each pass, so prefer a callable for exact resume).
    """
    if callable(data) and not isinstance(data, Iterable):
        index = start_micro
        while True:
            yield data(index)
            index += 1
    produced = 0
    while True:
        empty_pass = True
        for batch in data:
            empty_pass = False
            if produced >= start_micro:
                yield batch
            produced += 1
        if empty_pass:
            if produced == 0:
                raise ValueError("data yielded no batches: it is empty (check the dataset size and batch_size)")
            raise ValueError(
                f"data yielded no batches when iterated again after {produced} batches: a generator or "
                "iterator can only be used once; pass a list, a DataLoader or a callable step -> batch"
            )


# --------------------------------------------------------------------------- the loop


def _autocast(config: TrainConfig, device: torch.device):
    use_bf16 = device.type == "cuda" if config.bf16 == "auto" else config.bf16
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def _split_output(out, step: int) -> tuple[torch.Tensor, dict]:
    """``out`` -> (loss, {name: scalar tensor}); non-scalar dict entries (e.g. logits) are ignored."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(f"the model returned a dict without a 'loss' entry (keys {list(out)}) at step {step}")
        loss = out["loss"]
        scalars = {
            k: (v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
            for k, v in out.items()
            if k != "loss" and (_is_number(v) or isinstance(v, torch.Tensor) and v.numel() == 1)
        }
    else:
        loss, scalars = out, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar tensor, got {type(loss).__name__} at step {step}")
    if not loss.requires_grad:
        raise ValueError(f"the loss at step {step} does not require grad (was it computed under no_grad?)")
    return loss.reshape(()), {k: v.reshape(()) for k, v in scalars.items()}


def start_mode(path: str | os.PathLike, resume: bool, overwrite: bool, writes: bool = True,
               where: str = "checkpoint_path") -> str:
    """How a run with checkpoint file ``path`` starts: ``"fresh"``, ``"resume"`` or ``"overwrite"``.

    Refuses, with a ``ValueError`` that says what to do, whatever could lose work or do nothing
    silently: ``resume`` and ``overwrite`` together; a checkpoint path that is a dangling symlink
    or a directory; and a run without ``resume`` that would write (``writes``) over an existing
    checkpoint unless ``overwrite`` says so. ``resume`` without a checkpoint starts fresh (the
    first launch of a job that always passes ``resume``). ``where`` names the option that chose
    ``path``, for the messages.
    """
    path = Path(path)
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other: resume continues the "
                         f"checkpoint {path}, overwrite replaces it; pass one of them")
    if not (resume or writes):
        return "fresh"  # the path is neither read nor written
    if path.is_symlink() and not path.exists():
        raise ValueError(f"checkpoint {path} is a symlink to {os.readlink(path)}, which does not exist; "
                         "point it at the checkpoint to resume, or remove the link to start fresh")
    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file; pick another {where}")
    if resume:
        return "resume" if path.exists() else "fresh"
    if path.exists():
        if not overwrite:
            raise ValueError(f"checkpoint {path} already exists and this run would replace it: pass "
                             f"resume=True to continue it, overwrite=True to replace it, or another {where}")
        return "overwrite"
    return "fresh"


def check_resumable(path, step: int, steps: int) -> None:
    """A checkpoint at ``step`` beyond this config's ``steps`` would silently train nothing."""
    if step > steps:
        raise ValueError(f"checkpoint {path} is at step {step}, beyond steps={steps}: resuming would train "
                         f"nothing; pass steps >= {step} to continue it (or a new checkpoint path to start over)")


def start_line(mode: str, path, step: int = 0, steps: int = 0, resume: bool = False) -> str:
    """The one line every run prints: does it start fresh or resume, and from which step."""
    if mode == "fresh" and resume:
        return f"starting fresh: no checkpoint at {path} to resume yet"
    if mode == "resume":
        left = "nothing left to train" if step >= steps else f"{steps - step} steps to go"
        return f"resuming from step {step} of checkpoint {path} ({left})"
    if mode == "overwrite":
        return f"starting fresh; overwrite=True: checkpoint {path} will be replaced"
    return f"starting fresh; checkpoints go to {path}"


def _resume_state(config, model, optimizer, scheduler) -> tuple[int, History]:
    state = load_checkpoint(config.checkpoint_path, model, optimizer, scheduler, restore_rng=True)
    check_resumable(config.checkpoint_path, state["step"], config.steps)
    # The config's schedule is the authority (e.g. resuming with more steps): recompute the lr.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    return state["step"], History.from_dict(state["history"])


def _forward_backward(compute_loss, runner, batches, config, device, step) -> dict[str, torch.Tensor]:
    """Run ``accumulation_steps`` micro-batches, backpropagating loss / accumulation_steps each.

    Returns the sums over micro-batches of the (detached) loss and of every other logged scalar.
    """
    accum = config.accumulation_steps
    sums = {"loss": torch.zeros((), device=device)}
    for micro in range(accum):
        batch = move_to_device(next(batches), device)
        # DDP: all-reduce the gradients only on the last micro-batch.
        skip_sync = micro < accum - 1 and hasattr(runner, "no_sync")
        with runner.no_sync() if skip_sync else nullcontext():
            with _autocast(config, device):
                loss, scalars = _split_output(compute_loss(batch), step)
            (loss / accum).backward()
        sums["loss"] = sums["loss"] + loss.detach().float()
        for name, value in scalars.items():
            sums[name] = sums.get(name, 0.0) + value.to(device)
    return sums


def _step_record(step, optimizer, sums, grad_norm, accum) -> dict:
    """The History record of one step, fetched from the device in a single sync."""
    values = {name: total / accum for name, total in sums.items()}
    if grad_norm is not None:
        values["grad_norm"] = grad_norm.float().to(sums["loss"].device)
    numbers = torch.stack(list(values.values())).tolist()
    return {"step": step, "lr": optimizer.param_groups[0]["lr"], **dict(zip(values, numbers))}


def _log(bar, config: TrainConfig, record: dict) -> None:
    step = record["step"]
    if not config.log_every or (step % config.log_every and step != config.steps):
        return
    if config.progress:
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    else:
        print(f"step {step}/{config.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}")


def train(
    model: torch.nn.Module,
    data,
    config: TrainConfig,
    loss_fn: Callable | None = None,
    resume: bool = False,
    callback: Callable | None = None,
    overwrite: bool = False,
) -> History:
    """Train ``model`` for ``config.steps`` optimizer steps and return its :class:`History`.

    data: a callable ``index -> batch`` (preferred: deterministic, exact resume) or an iterable of
        batches, re-iterated when exhausted. Tensors in the batch are moved to the device.
    loss_fn: ``loss_fn(model, batch)`` instead of ``model(batch)``.
    resume: continue from ``config.checkpoint_path`` if that file exists (same losses as a run
        that was never interrupted, RNG states included); else start fresh. A checkpoint beyond
        ``config.steps`` or a dangling symlink is an error.
    callback: ``callback(step, history)`` after every step (e.g. to evaluate); the model is put
        back in train mode afterwards.
    overwrite: a run without ``resume`` that saves checkpoints (``checkpoint_every``) refuses to
        replace an existing ``checkpoint_path`` unless this is True.

    A run that resumes or saves checkpoints prints one line saying whether it starts fresh or
    resumes from step N (see :func:`start_mode`).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not (callable(data) or isinstance(data, Iterable)):
        raise ValueError(f"data must be a callable step -> batch or an iterable of batches, got {type(data).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("callback", callback)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
    _check_bool("resume", resume)
    _check_bool("overwrite", overwrite)
    if resume and config.checkpoint_path is None:
        raise ValueError("resume=True needs config.checkpoint_path")
    mode = "fresh"
    if config.checkpoint_path is not None:
        mode = start_mode(config.checkpoint_path, resume, overwrite, writes=config.checkpoint_every > 0)

    seed_everything(config.seed)
    device = get_device(str(config.device) if config.device is not None else None)
    model.to(device)
    optimizer = make_optimizer(model, config)
    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    start_step, history = 0, History()
    if mode == "resume":
        start_step, history = _resume_state(config, model, optimizer, scheduler)
    if resume or mode == "overwrite":  # this run owns the path
        remove_stale_temp_files(config.checkpoint_path)  # left by a save that was killed
    if resume or config.checkpoint_every:
        print(start_line(mode, config.checkpoint_path, start_step, config.steps, resume), flush=True)
    runner = torch.compile(model) if config.compile else model
    compute_loss = (lambda batch: loss_fn(runner, batch)) if loss_fn is not None else runner
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = bool(config.grad_clip)
    accum = config.accumulation_steps
    batches = _batch_stream(data, start_micro=start_step * accum)
    with tqdm(total=config.steps, initial=start_step, disable=not config.progress, desc="train") as bar:
        for step in range(start_step + 1, config.steps + 1):
            model.train()  # again every step: a callback may have switched to eval mode
            optimizer.zero_grad(set_to_none=True)  # at the start, so the last step's grads stay inspectable
            sums = _forward_backward(compute_loss, runner, batches, config, device, step)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if clip else None
            record = _step_record(step, optimizer, sums, grad_norm, accum)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"loss is {record['loss']} at step {step}; lower lr, check the inputs, or enable grad_clip"
                )
            optimizer.step()
            scheduler.step()
            history.append(record)
            bar.update(1)
            _log(bar, config, record)
            if callback is not None:
                callback(step, history)
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                save_checkpoint(config.checkpoint_path, model, optimizer, scheduler, step=step, history=history)
    return history
