"""GLOSSARY.md, the course's terms in English and Chinese.

Every link resolves; every row has an English term, a Chinese term, a definition and a notebook (a link
to an existing notebook, or "planned: NN" for one that does not exist yet); every notebook source links
the glossary in its first markdown cell, and so does the README.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GLOSSARY = ROOT / "GLOSSARY.md"
SOURCES = sorted((ROOT / "notebooks_src").glob("[0-9][0-9]_*.py"))

HEADER = ["English", "中文", "Definition", "Notebook"]
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
CJK = re.compile(r"[\u3400-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")
PLANNED = re.compile(r"planned: (\d\d)\b")
NOTEBOOK_LINK = re.compile(r"^notebooks/(\d\d)_[a-z0-9_]+\.ipynb$")

# Terms the glossary must keep (matched case-insensitively inside the English column).
REQUIRED = [
    "single-stream", "dual-stream", "two-tower", "fusion encoder", "co-attention", "cross-attention",
    "merged attention", "mixture of modality experts", "multiway", "encoder-decoder",
    "masked language modelling", "masked vision modelling", "masked region modelling", "MRFR", "(MRC)",
    "MRC-kl", "image-text matching", "image-text contrastive", "hard negatives", "word-region alignment",
    "optimal transport", "IPOT", "Sinkhorn", "region features", "grid features", "patch embedding", "RoI",
    "RoIAlign", "object detector", "WordPiece", "position embedding", "token type embedding", "[CLS]",
    "[SEP]", "[MASK]", "attention head", "pre-LN", "post-LN", "temperature", "recall@K", "zero-shot",
    "VQA", "visual grounding", "image captioning", "NLVR", "compositional", "caption noise",
    "momentum distillation", "PrefixLM", "causal language modelling", "scene graph", "frame order modelling",
    "visual words", "gradient accumulation", "mixed precision", "DDP", "gather with gradient", "MFU",
    "webdataset shards",
    # every system of the syllabus
    "VisualBERT", "B2T2", "Unicoder-VL", "VL-BERT", "Unified VLP", "UNITER", "Oscar", "ViLBERT", "12-in-1",
    "LXMERT", "ERNIE-ViL", "UNIMO", "Kaleido-BERT", "FashionBERT", "Pixel-BERT", "CLIP", "ALBEF", "BLIP",
    "CoCa", "VLMo", "BEiT-3", "X-VLM", "DALL-E", "VideoBERT",
]


def _text() -> str:
    return GLOSSARY.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _rows() -> list[tuple[int, list[str]]]:
    """(line number, cells) of every body row of every table; each table must have the glossary header."""
    rows, lines, i = [], _text().splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        assert _cells(lines[i]) == HEADER, f"GLOSSARY.md line {i + 1}: a table must have the header {HEADER}"
        assert i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()), \
            f"GLOSSARY.md line {i + 2}: the header must be followed by a separator row"
        i += 2
        while i < len(lines) and lines[i].startswith("|"):
            rows.append((i + 1, _cells(lines[i])))
            i += 1
    return rows


def test_glossary_exists_and_has_tables():
    assert GLOSSARY.is_file(), "GLOSSARY.md is missing at the repository root"
    assert len(_rows()) >= 100, f"GLOSSARY.md has only {len(_rows())} terms"


def test_every_link_points_to_an_existing_file_or_heading():
    text = _text()
    anchors = {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}
    links = LINK.findall(text)
    assert links, "GLOSSARY.md has no links"
    for label, target in links:
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"link [{label}]({target}): no heading with that anchor"
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_file(), f"link [{label}]({target}) points to a missing file"


def test_every_row_has_both_languages_a_definition_and_a_notebook():
    existing = {p.name[:2] for p in SOURCES}
    seen = {}
    for line, cells in _rows():
        assert len(cells) == 4, f"GLOSSARY.md line {line}: {len(cells)} cells, expected 4 (a stray '|'?)"
        english, chinese, definition, notebook = cells
        assert LATIN.search(english), f"line {line}: no English term"
        assert CJK.search(chinese), f"line {line} ({english}): no Chinese term"
        assert LATIN.search(definition) and len(definition.split()) >= 6, \
            f"line {line} ({english}): the definition is missing or too short"
        assert english.lower() not in seen, f"line {line}: {english!r} already defined on line {seen[english.lower()]}"
        seen[english.lower()] = line

        links, planned = LINK.findall(notebook), PLANNED.findall(notebook)
        assert links or planned, f"line {line} ({english}): the notebook column needs a link or 'planned: NN'"
        for label, target in links:
            m = NOTEBOOK_LINK.match(target)
            assert m, f"line {line} ({english}): {target!r} is not a notebook under notebooks/"
            assert label == m.group(1), f"line {line} ({english}): link text {label!r} should be {m.group(1)!r}"
        for number in planned:
            assert number not in existing, (
                f"line {line} ({english}): notebook {number} exists now; replace 'planned: {number}' by a link "
                f"to it")


def test_required_terms_are_present():
    english = "\n".join(cells[0].lower() for _, cells in _rows())
    missing = [term for term in REQUIRED if term.lower() not in english]
    assert not missing, f"GLOSSARY.md lacks the terms {missing}"


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_links_glossary_in_its_first_markdown_cell(source):
    builder = _builder()
    markdown = [text for kind, text in builder.parse(source.read_text(encoding="utf-8")) if kind == "markdown"]
    assert markdown, f"{source.name} has no markdown cell"
    first = builder.markdown_text(markdown[0])
    targets = [target for _, target in LINK.findall(first)]
    assert "../GLOSSARY.md" in targets, \
        f"{source.name}: the first markdown cell must link the glossary as [glossary](../GLOSSARY.md)"
    # notebooks/ and solutions/ are both one level below the root
    assert (ROOT / "notebooks" / "../GLOSSARY.md").resolve() == GLOSSARY.resolve()


def test_readme_links_glossary():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "GLOSSARY.md" in [target for _, target in LINK.findall(readme)], "README.md must link GLOSSARY.md"
