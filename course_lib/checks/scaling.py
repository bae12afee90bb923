"""Check functions for notebook 20 (scaling up: MFU, the batch plan, FLOPs of a layer).

Each ``check_*`` runs the learner's function on cases with known answers, prints ``PASS ...``, or
raises :class:`~course_lib.checks.verdict.ExerciseError` with a message that says what to fix.

- ``check_mfu(fn)``: model FLOPs utilisation, graded against ``course_lib.flops.mfu``;
- ``check_batch_plan(fn)``: micro-batch and accumulation steps for a fixed global batch, graded
  against a brute-force search and ``course_lib.pretrain``'s own batch plan;
- ``check_linear_flops(fn)``: FLOPs of ``nn.Linear`` forward + backward, graded against
  ``torch.utils.flop_counter.FlopCounterMode`` run on a real forward and backward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from course_lib.checks.verdict import call_learner, check_callable, expect, passed
from course_lib.flops import mfu, peak_flops


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _raises_value_error(fn, *args) -> bool:
    try:
        fn(*args)
    except ValueError:
        return True
    except Exception:  # noqa: BLE001 - any other outcome is "did not raise ValueError"
        return False
    return False


# --------------------------------------------------------------------------- MFU

# (samples/s over all devices, training FLOPs per sample, device name as torch reports it)
_MFU_CASES = (
    (2490.0, 3 * 41.1e9, "NVIDIA H100 80GB HBM3"),  # open_clip ViT-B/16, compiled: about 31%
    (1650.0, 3 * 41.1e9, "NVIDIA H100 80GB HBM3"),  # the same, eager
    (800.0, 3 * 41.1e9, "NVIDIA A100-SXM4-80GB"),
    (12000.0, 3 * 4.4e9, "NVIDIA L4"),
    (5.0e4, 2.0e8, "NVIDIA GeForce RTX 4090"),
)


def check_mfu(fn) -> None:
    """Grade ``fn(samples_per_s, flops_per_sample, peak) -> float``: the fraction (not percent) of
    the peak ``peak`` FLOP/s that ``samples_per_s`` samples of ``flops_per_sample`` training FLOPs
    each achieve; ``peak <= 0`` must raise ``ValueError``. Compared with ``course_lib.flops.mfu``
    (which looks the peak up by device name) to a relative 1e-9."""
    check = "mfu"
    check_callable("fn", fn, check)
    for samples, flops, device in _MFU_CASES:
        peak = peak_flops(device)
        want = mfu(samples, flops, device)
        got = call_learner(check, fn, samples, flops, peak)
        case = f"mfu({samples:g}, {flops:.4g}, {peak:.4g}) ({device})"
        expect(_is_number(got), check, f"{case} should return a float, got {type(got).__name__}")
        close = lambda x: math.isclose(got, x, rel_tol=1e-9)  # noqa: E731
        expect(not close(100 * want), check, f"{case}: return a fraction in [0, 1] (0.31), not a percentage (31)")
        expect(not close(3 * want), check, f"{case}: flops_per_sample already counts the whole training step "
                                           "(forward + backward = 3 x forward); do not multiply by 3 again")
        expect(not close(want / 3), check, f"{case}: flops_per_sample is already the training FLOPs "
                                           "(3 x forward); use it as it is")
        expect(not close(1 / want), check, f"{case}: achieved FLOP/s divided by the peak, not the other way round")
        expect(close(want), check, f"{case} should be {want:.6f} (achieved FLOP/s = samples/s x FLOPs/sample, "
                                   f"divided by the peak), got {got!r}")
    for bad_peak in (0.0, -989e12):
        expect(_raises_value_error(fn, 1000.0, 1e9, bad_peak), check,
               f"mfu(1000, 1e9, peak={bad_peak:g}) must raise ValueError naming peak: a peak must be positive "
               f"(a CPU has no meaningful peak)")
    passed(check, f"matches course_lib.flops.mfu on {len(_MFU_CASES)} (throughput, model, GPU) cases, "
                  "including open_clip's 2,490 samples/s on an H100 (31%); rejects a non-positive peak")


# --------------------------------------------------------------------------- batch plan

# (global_batch, world_size, max_micro_batch): a plan exists when world_size divides global_batch
_PLAN_CASES = (
    (4096, 8, 256), (4096, 8, 512), (4096, 8, 1000), (96, 2, 20), (1000, 4, 64), (64, 1, 64),
    (256, 1, 48), (32768, 64, 96), (12, 3, 1),
)
_NO_PLAN_CASES = ((2048, 3, 256), (100, 8, 64))


def reference_batch_plan(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """The largest micro-batch ``m <= max_micro_batch`` with ``m * k * world_size == global_batch``
    for an integer ``k``, found by trying every ``m`` (slow and obvious), and that ``k``."""
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} is not a multiple of world_size={world_size}")
    per_process = global_batch // world_size
    micro = max(m for m in range(1, min(max_micro_batch, per_process) + 1) if per_process % m == 0)
    return micro, per_process // micro


def _pretrain_batch_plan(global_batch: int, world_size: int, micro_batch: int) -> tuple[int, int]:
    """What ``python -m course_lib.pretrain --global_batch=G --micro_batch=M`` runs on ``world_size`` processes."""
    from course_lib.pretrain import PretrainConfig, _batch_plan

    return _batch_plan(PretrainConfig(global_batch=global_batch, micro_batch=micro_batch), world_size)


def check_batch_plan(fn) -> None:
    """Grade ``fn(global_batch, world_size, max_micro_batch) -> (micro_batch, accumulation)``.

    The plan must keep the global batch exact (``micro_batch * accumulation * world_size ==
    global_batch``), fit in memory (``micro_batch <= max_micro_batch``) and take the largest such
    micro-batch (the fewest accumulation steps); ``world_size`` not dividing ``global_batch`` must
    raise ``ValueError``. Each plan is also run through ``course_lib.pretrain``'s batch plan."""
    check = "batch_plan"
    check_callable("fn", fn, check)
    for global_batch, world, max_micro in _PLAN_CASES:
        case = f"batch_plan(global_batch={global_batch}, world_size={world}, max_micro_batch={max_micro})"
        got = call_learner(check, fn, global_batch, world, max_micro)
        expect(isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(v, int) and
               not isinstance(v, bool) for v in got), check,
               f"{case} should return two ints (micro_batch, accumulation), got {got!r}")
        micro, accum = got
        want = reference_batch_plan(global_batch, world, max_micro)
        expect(micro >= 1 and accum >= 1, check, f"{case} returned {got}: both must be at least 1")
        expect(micro * accum != global_batch or world == 1, check,
               f"{case} returned {got}: every one of the {world} processes runs micro_batch x accumulation "
               f"samples per step, so micro_batch x accumulation x world_size must be {global_batch}; "
               f"you left out world_size")
        expect(micro * accum * world == global_batch, check,
               f"{case} returned {got}: micro_batch x accumulation x world_size = {micro * accum * world}, "
               f"not the global batch {global_batch}")
        expect(micro <= max_micro, check, f"{case} returned {got}: micro_batch {micro} does not fit in memory "
                                          f"(at most {max_micro})")
        expect(micro == want[0], check, f"{case} returned {got}: {want} also fits and needs fewer accumulation "
                                        f"steps (each one is a pass over a smaller, less efficient batch); take the "
                                        f"largest micro-batch that divides global_batch / world_size")
        expect(_pretrain_batch_plan(global_batch, world, micro) == (micro, accum), check,
               f"{case}: course_lib.pretrain plans {_pretrain_batch_plan(global_batch, world, micro)} for "
               f"--micro_batch={micro}, you said {got}")
    for global_batch, world, max_micro in _NO_PLAN_CASES:
        expect(_raises_value_error(fn, global_batch, world, max_micro), check,
               f"batch_plan({global_batch}, {world}, {max_micro}) must raise ValueError: {world} processes cannot "
               f"share {global_batch} samples equally, so no plan keeps the global batch exact")
    passed(check, f"{len(_PLAN_CASES)} plans keep the global batch exact with the fewest accumulation steps and "
                  f"agree with course_lib.pretrain; impossible plans raise ValueError")


# --------------------------------------------------------------------------- FLOPs of a linear layer


def counted_linear_flops(batch_size: int, in_features: int, out_features: int) -> int:
    """FLOPs of ``nn.Linear(in_features, out_features)`` forward + backward on an input
    ``(batch_size, in_features)`` that requires a gradient, as ``FlopCounterMode`` counts them."""
    layer = nn.Linear(in_features, out_features)
    x = torch.randn(batch_size, in_features, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        layer(x).sum().backward()
    return counter.get_total_flops()


_LINEAR_CASES = ((4, 3, 5), (32, 64, 256), (7, 128, 10), (1, 768, 3072))


def check_linear_flops(fn) -> None:
    """Grade ``fn(batch_size, in_features, out_features) -> int``: FLOPs of one forward and one
    backward pass of ``nn.Linear`` on an input ``(batch_size, in_features)`` that needs a gradient
    (as inside a network), bias additions not counted, 2 FLOPs per multiply-add. Compared exactly
    with ``FlopCounterMode`` run on a real forward and backward pass."""
    check = "linear_flops"
    check_callable("fn", fn, check)
    for b, i, o in _LINEAR_CASES:
        case = f"linear_flops(batch_size={b}, in_features={i}, out_features={o})"
        want = counted_linear_flops(b, i, o)
        got = call_learner(check, fn, b, i, o)
        expect(_is_number(got), check, f"{case} should return a number, got {type(got).__name__}")
        products = b * i * o  # multiply-adds of one matrix product
        expect(got != 2 * products, check, f"{case} = {got} is the forward pass only; backward computes two more "
                                           f"products of the same size: dL/dx = dL/dy W and dL/dW = dL/dy^T x")
        expect(got != 4 * products, check, f"{case} = {got} counts one backward product only; the input needs its "
                                           f"gradient (dL/dx, for the layers below) AND the weight (dL/dW)")
        expect(got != 3 * products, check, f"{case} = {got}: a multiply-add is 2 FLOPs (one multiply, one add)")
        expect(got == want, check, f"{case} should be {want} (FlopCounterMode on a real forward + backward), "
                                   f"got {got}")
    passed(check, f"equals FlopCounterMode's count of a real forward + backward on {len(_LINEAR_CASES)} layer sizes")
