"""Start JupyterLab on the course so that a notebook looks right the first time it is opened,
and still after it is saved. ``./course.sh lab`` runs it; so does ``tests/test_browser.py``.

Usage: ``python tools/course_lab.py [jupyter lab arguments...]``

Three things stand between a built notebook and its widgets:

1. **Trust.** JupyterLab draws a widget output (and HTML) only for a trusted notebook; an
   untrusted one shows the widget's text form, ``VBox(children=...)``. The course's built
   notebooks (``notebooks/`` and ``solutions/``) are signed into nbformat's signature store,
   the one JupyterLab checks (``$JUPYTER_DATA_DIR/nbsignatures.db``, ``jupyter trust`` does the
   same). A signature covers the content, so copies are trusted and edited notebooks judged afresh.
2. **Widget state on save.** A notebook's widgets are drawn from the state stored in its
   metadata (the build stores it). JupyterLab writes the live widgets' state on save only with
   the ipywidgets setting ``saveState`` on; otherwise a notebook saved after running its cells
   keeps the old state, and its new widgets say "Error displaying widget: model not found" when
   it is next opened. ``tools/jupyter_config/labconfig/default_setting_overrides.json`` turns it
   on; that folder is put on ``JUPYTER_CONFIG_PATH`` for this JupyterLab only.
3. **Widgets not run yet.** With ``saveState`` on, JupyterLab writes only the widgets that live
   in the kernel: saving a notebook opened but not run (an autosave is enough) would drop the
   stored state of every widget still shown, with the same error on the next open. The pre-save
   hook :func:`keep_widget_state` keeps the stored state of those widgets.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "jupyter_config"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MODEL_REFERENCE = re.compile(r"IPY_MODEL_([0-9a-f]+)")


def trust(notebooks: list[Path]) -> None:
    """Sign ``notebooks`` into the signature store JupyterLab reads."""
    import nbformat
    from nbformat.sign import NotebookNotary

    notary = NotebookNotary()
    for path in notebooks:
        notary.sign(nbformat.read(path, as_version=4))
    print(f"course_lab: {len(notebooks)} course notebooks trusted ({notary.db_file})", file=sys.stderr)


def shown_widgets(notebook: dict) -> set[str]:
    """The model ids of the widgets the notebook's outputs display."""
    return {out["data"][WIDGET_VIEW].get("model_id") for cell in notebook.get("cells", [])
            for out in cell.get("outputs", []) if WIDGET_VIEW in out.get("data", {})}


def with_references(model_ids: set[str], state: dict) -> dict:
    """The entries of ``state`` for ``model_ids`` and every model they refer to (children, layouts, styles)."""
    kept, todo = {}, list(model_ids)
    while todo:
        model_id = todo.pop()
        if model_id in kept or model_id not in state:
            continue
        kept[model_id] = state[model_id]
        todo += MODEL_REFERENCE.findall(json.dumps(state[model_id]))
    return kept


def keep_widget_state(model: dict, path: str, contents_manager, **kwargs) -> None:
    """Pre-save hook: a widget the notebook still shows but whose state is not being saved (it was
    never run in this session) keeps the state stored in the file on disk."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    notebook = model["content"]
    saving = notebook.setdefault("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {})
    missing = shown_widgets(notebook) - set(saving.get("state", {}))
    if not missing:
        return
    try:
        with open(Path(contents_manager.root_dir) / path, encoding="utf-8") as file:
            stored = json.load(file)["metadata"]["widgets"][WIDGET_STATE]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new notebook, or one without stored widget state: nothing to keep
    kept = with_references(missing, stored.get("state", {}))
    if kept:
        state = {**kept, **saving.get("state", {})}
        notebook["metadata"]["widgets"] = {WIDGET_STATE: {**stored, **saving, "state": state}}


def main(argv: list[str]) -> int:
    """Trust the course's notebooks, then run JupyterLab with the course's settings and hook."""
    trust(sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("solutions/*.ipynb")))
    os.environ["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(CONFIG_DIR), os.environ.get("JUPYTER_CONFIG_PATH")]))
    from jupyterlab.labapp import LabApp

    # this file is importable as ``course_lab``: it runs from tools/, which is sys.path[0]
    LabApp.launch_instance(argv=["--ContentsManager.pre_save_hook=course_lab.keep_widget_state", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
