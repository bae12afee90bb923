"""The built notebooks are exactly what ``tools/build_notebooks.py`` makes from ``notebooks_src/``
(sources and notebooks cannot drift), and every notebook supports the harness's smoke scale."""

import re
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.thresholds import assert_learned

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402

SOURCES = sorted((ROOT / "notebooks_src").glob("*.py"))


def cell_structure(nb) -> list[tuple[str, str, list[str]]]:
    """What the source decides: each cell's type, text and tags (not outputs or execution counts)."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("folder,solutions", [("notebooks", False), ("solutions", True)])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_built_notebook_matches_its_source(src, folder, solutions):
    built_path = ROOT / folder / f"{src.stem}.ipynb"
    assert built_path.exists(), f"{built_path} is missing: run python tools/build_notebooks.py {src.name[:2]}"
    expected = build_notebooks.build(build_notebooks.parse(src.read_text()), solutions)
    built = nbformat.read(built_path, as_version=4)
    assert cell_structure(built) == cell_structure(expected), (
        f"{folder}/{src.stem}.ipynb differs from notebooks_src/{src.name}: "
        f"rebuild it with python tools/build_notebooks.py {src.name[:2]}")


def test_no_built_notebook_without_a_source():
    stems = {p.stem for p in SOURCES}
    for folder in ("notebooks", "solutions"):
        orphans = {p.stem for p in (ROOT / folder).glob("*.ipynb")} - stems
        assert not orphans, f"{folder}/ has notebooks without a source in notebooks_src/: {sorted(orphans)}"


@pytest.mark.parametrize("folder", ["notebooks", "solutions"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_built_notebook_was_executed(src, folder):
    """Readers see figures without running anything: every code cell that runs has been run."""
    nb = nbformat.read(ROOT / folder / f"{src.stem}.ipynb", as_version=4)
    unrun = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is None
             and "skip-execution" not in c.metadata.get("tags", [])]
    assert not unrun, f"{folder}/{src.stem}.ipynb has cells that were never executed: {unrun}"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_has_parameters_cell_and_smoke_scale(src):
    cells = build_notebooks.parse(src.read_text())
    parameters = [text for kind, text in cells if kind == "parameters"]
    assert len(parameters) == 1 and re.match(r'SCALE = "cpu"', parameters[0]), \
        f"{src.name}: needs exactly one parameters cell starting with SCALE = \"cpu\""
    assert '"smoke": dict(' in src.read_text(), f"{src.name}: its RUN dict needs a \"smoke\" entry (a few steps)"


def test_assert_learned_asserts_except_at_smoke(capsys):
    assert_learned(True, "fine", "cpu")
    with pytest.raises(AssertionError, match="R@1 0.01 is at chance"):
        assert_learned(False, "R@1 0.01 is at chance", "cpu")
    assert_learned(False, "R@1 0.01 is at chance", "smoke")
    assert "not asserted" in capsys.readouterr().out
    with pytest.raises(ValueError, match="scale='tiny'"):
        assert_learned(True, "x", "tiny")
