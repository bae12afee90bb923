"""The grading functions of notebook 20 (scaling up) accept right answers and reject the usual
mistakes with a message that names them. Values are exact or compared by the checks themselves
(MFU to a relative 1e-9, plans and FLOP counts exactly)."""

import pytest

from course_lib.checks import ExerciseError
from course_lib.checks.scaling import (check_batch_plan, check_linear_flops, check_mfu, counted_linear_flops,
                                       reference_batch_plan)


def right_mfu(samples_per_s, flops_per_sample, peak):
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    return samples_per_s * flops_per_sample / peak


def test_mfu_accepts_the_formula(capsys):
    check_mfu(right_mfu)
    assert "PASS mfu" in capsys.readouterr().out
    assert right_mfu(2490, 3 * 41.1e9, 989e12) == pytest.approx(0.3104, abs=1e-4)  # open_clip on an H100, by hand


@pytest.mark.parametrize("wrong, message", [
    (lambda s, f, p: 100 * right_mfu(s, f, p), "not a percentage"),
    (lambda s, f, p: 3 * right_mfu(s, f, p), "do not multiply by 3"),
    (lambda s, f, p: p / (s * f), "not the other way round"),
    (lambda s, f, p: s * f / 312e12, "should be"),  # nanoGPT's hard-coded A100 peak
    (lambda s, f, p: s * f / p, "must raise ValueError naming peak"),  # no check of the peak
])
def test_mfu_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_mfu(wrong)


def right_plan(global_batch, world_size, max_micro_batch):
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} is not a multiple of world_size={world_size}")
    per_process = global_batch // world_size
    micro = next(m for m in range(min(max_micro_batch, per_process), 0, -1) if per_process % m == 0)
    return micro, per_process // micro


def test_batch_plan_reference_by_hand():
    assert reference_batch_plan(4096, 8, 256) == (256, 2)
    assert reference_batch_plan(96, 2, 20) == (16, 3)  # 48 per process: 16 is its largest divisor <= 20
    assert reference_batch_plan(1000, 4, 64) == (50, 5)
    with pytest.raises(ValueError, match="world_size"):
        reference_batch_plan(100, 8, 64)


def test_batch_plan_accepts_the_largest_micro_batch(capsys):
    check_batch_plan(right_plan)
    assert "PASS batch_plan" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (lambda g, w, m: (min(m, g), max(1, g // min(m, g))), "left out world_size"),  # forgets the processes
    (lambda g, w, m: right_plan(g, w, 10**9), "does not fit in memory"),  # ignores the memory limit
    (lambda g, w, m: (1, g // w) if g % w == 0 else right_plan(g, w, m), "fewer accumulation steps"),
    (lambda g, w, m: (min(m, g // w), g // (w * min(m, g // w))), "not the global batch"),  # rounds down
    (lambda g, w, m: right_plan(g, w, m) if g % w == 0 else (1, 1), "must raise ValueError"),
])
def test_batch_plan_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_batch_plan(wrong)


def test_linear_flops_counted_by_hand():
    assert counted_linear_flops(4, 3, 5) == 6 * 4 * 3 * 5  # forward 2Bio + dL/dx 2Bio + dL/dW 2Bio


def test_linear_flops_accepts_six_b_i_o(capsys):
    check_linear_flops(lambda b, i, o: 6 * b * i * o)
    assert "PASS linear_flops" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (lambda b, i, o: 2 * b * i * o, "forward pass only"),
    (lambda b, i, o: 4 * b * i * o, "one backward product only"),
    (lambda b, i, o: 3 * b * i * o, "a multiply-add is 2 FLOPs"),
    (lambda b, i, o: 6 * b * i * o + b * o, "should be"),  # counts the bias additions
    (lambda b, i, o: "6BIO", "should return a number"),
])
def test_linear_flops_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_linear_flops(wrong)


def test_unfinished_and_bad_arguments():
    def unfinished(*args):
        raise NotImplementedError

    for check in (check_mfu, check_batch_plan, check_linear_flops):
        with pytest.raises(ExerciseError, match="NotImplementedError"):
            check(unfinished)
        with pytest.raises(ValueError, match="fn must be the function you wrote"):
            check("not a function")
