"""Every exercise of every notebook, read from ``notebooks_src/``: each check gives the unsolved starter
a clean "not yet" verdict (an ``ExerciseError`` that IPython shows as one line, with no frame or source
line of ``course_lib/checks``), and the solved version passes every check of its cell. One test runs
the starters in a real Jupyter kernel and reads the error outputs a learner (and the browser test) sees.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks.verdict import NOT_YET, ExerciseError

ROOT = Path(__file__).resolve().parent.parent
CHECKS_DIR = ROOT / "course_lib" / "checks"
sys.path.insert(0, str(ROOT / "tools"))
from build_notebooks import SRC, parse  # noqa: E402


def exercise_cells() -> list[tuple[str, str, str]]:
    """``(id, starter, solution)`` for every ``[exercise]`` cell and the ``[solution]`` cell after it."""
    found = []
    for src in sorted(SRC.glob("*.py")):
        cells = parse(src.read_text())
        for k, (kind, text) in enumerate(cells):
            if kind == "exercise":
                twin = next((t for kd, t in cells[k + 1:] if kd in ("exercise", "solution")), None)
                assert twin is not None and cells[k + 1][0] == "solution", \
                    f"{src.name}: exercise cell {k} is not followed by its solution cell"
                found.append((f"{src.stem}[{k}]", text, cells[k + 1][1]))
    return found


EXERCISES = exercise_cells()


def split_checks(code: str) -> tuple[str, list[str]]:
    """The cell's code without its top-level ``check_*(...)`` calls, and those calls."""
    tree = ast.parse(code)
    calls = [node for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and isinstance(node.value.func, ast.Name) and node.value.func.id.startswith("check_")]
    rest = ast.Module(body=[node for node in tree.body if node not in calls], type_ignores=[])
    return ast.unparse(rest), [ast.unparse(node) for node in calls]


STARTER_CHECKS = [(f"{name}:{call.split('(')[0]}", starter, call)
                  for name, starter, _ in EXERCISES for call in split_checks(starter)[1]]


@pytest.fixture(scope="module")
def namespace():
    """What the notebooks define before their exercises and the exercise cells use."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.features.text import train_tokenizer

    tokenizer = train_tokenizer(ShapeWorld(WorldConfig()).corpus(300), vocab_size=256)
    return {"torch": torch, "math": math, "F": F, "nn": nn, "np": np, "tokenizer": tokenizer}


def test_every_notebook_with_exercises_is_covered():
    notebooks = {name.split("[")[0] for name, _, _ in EXERCISES}
    assert len(notebooks) == len(list(SRC.glob("*.py"))), "a notebook has no [exercise] cell"
    assert len(STARTER_CHECKS) >= 20  # 00: 3, 01: 3, 02: 3, 03: 3, 04: 2, 05: 1, 06: 2, 07: 2, 20: 3


def source_lines_of_checks() -> list[str]:
    """Code lines of course_lib/checks (not string literals): what a verdict must never show."""
    lines = []
    for path in CHECKS_DIR.glob("*.py"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if len(line) >= 20 and not line.startswith(("#", '"', "f\"", "'", "``", "-")):
                lines.append(line)
    return lines


CHECK_SOURCE = source_lines_of_checks()


def assert_clean_not_yet(error: ExerciseError, check_name: str) -> None:
    assert error.verdict == NOT_YET, f"{check_name} on the starter: {error}"
    assert ": not yet: fill in " in str(error)
    rendered = error._render_traceback_()
    assert len(rendered) == 1 and rendered[0].endswith(str(error)), rendered
    text = "\n".join(rendered)
    for leak in ("course_lib/checks", "Traceback", 'File "'):
        assert leak not in text
    assert not [line for line in CHECK_SOURCE if line in text]


@pytest.mark.parametrize("starter, call", [(s, c) for _, s, c in STARTER_CHECKS],
                         ids=[name for name, _, _ in STARTER_CHECKS])
def test_starter_gets_a_clean_not_yet_verdict(namespace, starter, call):
    ns = dict(namespace)
    definitions, _ = split_checks(starter)
    exec(compile(definitions, "<starter>", "exec"), ns)  # imports and the starter's functions
    with pytest.raises(ExerciseError) as info:
        exec(compile(call, "<starter>", "exec"), ns)
    assert_clean_not_yet(info.value, call)


@pytest.mark.parametrize("solution", [s for _, _, s in EXERCISES], ids=[name for name, _, _ in EXERCISES])
def test_solution_passes_every_check(namespace, solution):
    ns, out = dict(namespace), io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(solution, "<solution>", "exec"), ns)
    calls = split_checks(solution)[1]
    passes = [line for line in out.getvalue().splitlines() if line.startswith("PASS ")]
    assert len(passes) == len(calls), out.getvalue()


# --------------------------------------------------------------------------- the verdict itself


def test_wrong_answer_and_learner_crash_verdicts():
    from course_lib.checks.shapeworld import check_count_color

    with pytest.raises(ExerciseError, match=r"check_count_color: wrong: scene \d+ has") as info:
        check_count_color(lambda scene, color: len(scene.objects))
    assert info.value.verdict == "wrong" and len(info.value._render_traceback_()) == 1

    def count_color(scene, color):
        return sum(o.colour == color for o in scene.objects)  # a typo: colour

    with pytest.raises(ExerciseError, match="wrong: count_color raised AttributeError") as info:
        check_count_color(count_color)
    rendered = info.value._render_traceback_()
    assert rendered[1] == "Where in your code:"
    assert "in count_color" in rendered[2] and "o.colour == color" in rendered[3]  # the learner's own line
    assert rendered[-1].startswith("AttributeError")
    assert "course_lib/checks" not in "\n".join(rendered) and "verdict.py" not in "\n".join(rendered)


def test_not_a_function_is_a_value_error_and_a_verdict():
    from course_lib.checks.shapeworld import check_count_color

    with pytest.raises(ValueError, match="count_color must be the function you wrote.*no parentheses") as info:
        check_count_color(3)
    assert isinstance(info.value, ExerciseError) and len(info.value._render_traceback_()) == 1


def test_exercise_error_pickles():
    import pickle

    from course_lib.checks.verdict import CheckArgumentError, not_yet

    for error in (not_yet("check_x", "fill in f"), CheckArgumentError("check_x", "fn must be")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.verdict == error.verdict


def test_checks_never_call_the_learner_directly():
    """Every call of the learner's function goes through ``call_learner`` (so a starter gets a verdict,
    not a raw error): no check module calls one of its own parameters."""
    import course_lib.checks as package

    for path in CHECKS_DIR.glob("*.py"):
        if path.name in ("__init__.py", "verdict.py"):
            continue
        module = __import__(f"{package.__name__}.{path.stem}", fromlist=["_"])
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("check_") or fn.__module__ != module.__name__:
                continue
            params = set(inspect.signature(fn).parameters)
            direct = [node.func.id for node in ast.walk(ast.parse(inspect.getsource(fn)))
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in params]
            assert not direct, f"{module.__name__}.{name} calls {direct} directly; use call_learner"


# --------------------------------------------------------------------------- in a real kernel


def test_starters_in_a_jupyter_kernel():
    """What a learner sees: each starter cell, run in a kernel, gives one error output with
    ``ename == "ExerciseError"``, an ``evalue`` with ": not yet: fill in", and a one-line traceback."""
    import nbformat
    from nbclient import NotebookClient

    setup = ("import math\nimport numpy as np\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
             "from course_lib.data import ShapeWorld, WorldConfig\n"
             "from course_lib.features.text import train_tokenizer\n"
             "tokenizer = train_tokenizer(ShapeWorld(WorldConfig()).corpus(100), vocab_size=256)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup)]
                                  + [nbformat.v4.new_code_cell(starter) for _, starter, _ in EXERCISES])
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert not [o for o in nb.cells[0].outputs if o.output_type == "error"], nb.cells[0].outputs
    for (name, _, _), cell in zip(EXERCISES, nb.cells[1:]):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert len(errors) == 1, f"{name}: {cell.outputs}"
        error = errors[0]
        assert error.ename == "ExerciseError", f"{name}: {error.ename}: {error.evalue}"
        assert ": not yet: fill in " in error.evalue, f"{name}: {error.evalue}"
        assert error.traceback == [f"\x1b[31mExerciseError\x1b[39m: {error.evalue}"], f"{name}: {error.traceback}"
