"""Build ``notebooks/NN_topic.ipynb`` and its twin ``solutions/NN_topic.ipynb`` from one source,
``notebooks_src/NN_topic.py``, so the two never disagree (d2l's lesson: a book and its library
that drift apart are what users complain about most).

Source format (percent cells, as jupytext writes them)::

    # %% [markdown]
    # # Title ... (markdown lines start with "# ")
    # %% [parameters]
    SCALE = "cpu"
    # %%
    ordinary code, in both notebooks
    # %% [exercise]
    starter code: only in notebooks/, skipped by the tests
    # %% [solution]
    the solved exercise: only in solutions/

Usage::

    python tools/build_notebooks.py               # build every notebook, executed (outputs stored)
    python tools/build_notebooks.py 01 02         # only these
    python tools/build_notebooks.py --no-execute  # structure only
    python tools/build_notebooks.py 00 --only-folder solutions
    python tools/build_notebooks.py 02 --prose-only  # only markdown changed: keep the stored outputs

Executed notebooks keep their outputs: nbval compares the cells marked ``# NBVAL_CHECK_OUTPUT``
against them, and readers see the figures without running anything.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SRC, STUDENT, SOLUTION = ROOT / "notebooks_src", ROOT / "notebooks", ROOT / "solutions"
CELL = re.compile(r"^# %%(?: \[(\w+)\])?\s*$")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def parse(source: str) -> list[tuple[str, str]]:
    """``[(kind, text), ...]`` with kind in markdown, code, parameters, exercise, solution."""
    cells, kind, lines = [], None, []
    for line in source.splitlines():
        m = CELL.match(line)
        if m:
            if kind is not None:
                cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = m.group(1) or "code", []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(lines).strip("\n")))
    unknown = {k for k, _ in cells} - {"markdown", "code", "parameters", "exercise", "solution"}
    if unknown:
        raise ValueError(f"unknown cell kinds {sorted(unknown)}")
    return cells


def markdown_text(text: str) -> str:
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())


def build(cells, solutions: bool) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNEL, "language_info": {"name": "python"}})
    for kind, text in cells:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(markdown_text(text)))
        elif kind == "solution" and not solutions or kind == "exercise" and solutions:
            continue
        else:
            tags = {"parameters": ["parameters"], "exercise": ["exercise", "skip-execution", "nbval-skip"],
                    "solution": ["solution"]}.get(kind, [])
            nb.cells.append(nbformat.v4.new_code_cell(text, metadata={"tags": tags} if tags else {}))
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path) -> float:
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                   skip_cells_with_tag="skip-execution").execute()
    return time.perf_counter() - start


def with_new_prose(built: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``built`` (executed) with the markdown cells of ``fresh``; its code cells and outputs are kept.
    Raises ``ValueError`` when the code cells differ: then the notebook must be executed again."""
    def code(nb):
        return [(c.source, c.metadata.get("tags", [])) for c in nb.cells if c.cell_type == "code"]

    if code(built) != code(fresh):
        raise ValueError("code cells changed since the notebook was built: run without --prose-only")
    outputs = iter(c for c in built.cells if c.cell_type == "code")
    built.cells = [next(outputs) if c.cell_type == "code" else c for c in fresh.cells]
    return built


def main() -> int:
    parser = argparse.ArgumentParser(description="Build notebooks/ and solutions/ from notebooks_src/.")
    parser.add_argument("only", nargs="*", help="notebook number prefixes, e.g. 01 02")
    parser.add_argument("--no-execute", action="store_true")
    parser.add_argument("--only-folder", choices=("notebooks", "solutions"),
                        help="build only the student notebooks or only the solutions")
    parser.add_argument("--prose-only", action="store_true",
                        help="update only the markdown cells of already built notebooks (refused when code changed)")
    args = parser.parse_args()
    sources = sorted(p for p in SRC.glob("*.py") if not args.only or p.name[:2] in args.only)
    if not sources:
        print(f"no sources in {SRC} match {args.only}", file=sys.stderr)
        return 1
    for src in sources:
        cells = parse(src.read_text())
        for solutions, folder in ((False, STUDENT), (True, SOLUTION)):
            if args.only_folder and folder.name != args.only_folder:
                continue
            nb = build(cells, solutions)
            folder.mkdir(exist_ok=True)
            if args.prose_only:
                nb = with_new_prose(nbformat.read(folder / f"{src.stem}.ipynb", as_version=4), nb)
            elif not args.no_execute:
                try:
                    seconds = execute(nb, folder)
                except Exception:
                    nbformat.write(nb, Path("/tmp") / f"FAILED_{folder.name}_{src.stem}.ipynb")
                    print(f"failed: the partly executed notebook is in /tmp/FAILED_{folder.name}_{src.stem}.ipynb")
                    raise
                print(f"{folder.name}/{src.stem}.ipynb executed in {seconds:.1f} s")
            nbformat.write(nb, folder / f"{src.stem}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
