"""Session-wide pytest hooks for ``./course.sh test``.

1. The student notebooks (``notebooks/``) run at ``SCALE = "smoke"``: the test harness replaces the
   source of the cell tagged ``parameters`` in memory (the file a learner opens is untouched), so they
   run the same code path for a few training steps, and their outputs are not compared (their
   ``solutions/`` twins run at full scale, compare the checked outputs and assert every learning
   threshold). ``--student-scale=cpu`` runs them at full scale instead.
2. A per-notebook run-time summary at the end: nbval makes one test item per notebook cell; the
   summary adds up their setup, call and teardown times per notebook (the kernel start is in the first
   cell's setup), which is how long the notebook takes top to bottom. These are the figures recorded
   in BENCHMARKS.md.
"""

from collections import defaultdict
from pathlib import Path

_notebook_seconds: dict[str, float] = defaultdict(float)
STUDENT_FOLDER = "notebooks"


def pytest_addoption(parser):
    parser.addoption("--student-scale", default="smoke", choices=("smoke", "cpu"),
                     help="SCALE the notebooks/ twins run at under test (default: smoke, a few steps)")


def pytest_collection_modifyitems(config, items):
    scale = config.getoption("--student-scale")
    if scale == "cpu":
        return
    for item in items:
        if not str(item.nodeid).split("::")[0].endswith(".ipynb"):
            continue
        if Path(item.nodeid.split("::")[0]).parent.name != STUDENT_FOLDER:
            continue
        item.options["check"] = False  # outputs come from a full-scale run; a smoke run differs
        if "parameters" in item.cell.metadata.get("tags", []):
            item.cell.source = f'SCALE = "{scale}"  # injected by the test harness (conftest.py)'


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    terminalreporter.section("notebook run times (all cells, kernel start included)")
    for path, seconds in sorted(_notebook_seconds.items()):
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
    terminalreporter.write_line(f"{sum(_notebook_seconds.values()):7.1f} s  in all")
