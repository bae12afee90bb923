"""Session-wide pytest hooks: a per-notebook run-time summary at the end of ``./course.sh test``.

nbval makes one test item per notebook cell; the summary adds up their setup, call and teardown
times per notebook (the kernel start is in the first cell's setup), which is how long the notebook
takes top to bottom. These are the figures recorded in BENCHMARKS.md.
"""

from collections import defaultdict

_notebook_seconds: dict[str, float] = defaultdict(float)


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
