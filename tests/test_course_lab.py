"""The pre-save hook of ``tools/course_lab.py`` (the JupyterLab ``./course.sh lab`` starts): saving a
notebook keeps the stored state of the widgets it shows but did not run (no browser needed)."""

import json
from types import SimpleNamespace

from tools.course_lab import WIDGET_STATE, WIDGET_VIEW, keep_widget_state


def widget(model_name: str, children: tuple[str, ...] = ()) -> dict:
    return {"model_name": model_name, "state": {"children": [f"IPY_MODEL_{c}" for c in children]}}


def notebook(shown: list[str], state: dict | None) -> dict:
    """A notebook whose outputs show the widgets ``shown``, with widget ``state`` in its metadata."""
    outputs = [{"output_type": "display_data", "data": {WIDGET_VIEW: {"model_id": m}, "text/plain": "VBox()"}}
               for m in shown]
    metadata = {} if state is None else {"widgets": {WIDGET_STATE: {"version_major": 2, "version_minor": 0,
                                                                    "state": state}}}
    return {"cells": [{"cell_type": "code", "outputs": outputs, "metadata": {}, "source": ""}],
            "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


def save(tmp_path, on_disk: dict, saving: dict) -> dict:
    """Run the hook as JupyterLab's save does: ``saving`` replaces the file holding ``on_disk``."""
    (tmp_path / "nb.ipynb").write_text(json.dumps(on_disk))
    model = {"type": "notebook", "content": saving}
    keep_widget_state(model=model, path="nb.ipynb", contents_manager=SimpleNamespace(root_dir=str(tmp_path)))
    return model["content"]["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state")


STORED = {"aa": widget("VBoxModel", ("bb",)), "bb": widget("IntSliderModel", ("cc",)), "cc": widget("LayoutModel"),
          "dd": widget("HTMLModel")}  # dd: shown by no output any more


def test_an_opened_but_not_run_notebook_keeps_its_stored_widgets(tmp_path):
    # saveState writes only live widgets: none, for a notebook that was opened and not run
    state = save(tmp_path, notebook(["aa"], STORED), notebook(["aa"], {}))
    assert set(state) == {"aa", "bb", "cc"}  # the shown widget and what it refers to, not dd
    assert state["aa"] == STORED["aa"]


def test_a_notebook_saved_without_widget_state_keeps_the_stored_one(tmp_path):
    state = save(tmp_path, notebook(["aa"], STORED), notebook(["aa"], None))
    assert set(state) == {"aa", "bb", "cc"}


def test_live_widgets_win_and_re_run_widgets_drop_the_old_state(tmp_path):
    live = {"ee": widget("VBoxModel"), "aa": widget("VBoxModel")}
    state = save(tmp_path, notebook(["aa"], STORED), notebook(["ee", "aa"], live))
    assert state == live  # every shown widget is live: nothing is taken from the file
    state = save(tmp_path, notebook(["aa"], STORED), notebook(["ee"], {"ee": live["ee"]}))
    assert state == {"ee": live["ee"]}  # the cell was re-run: its old widgets are not shown any more


def test_nothing_to_keep(tmp_path):
    assert save(tmp_path, notebook([], None), notebook(["aa"], {})) == {}  # no stored state
    (tmp_path / "nb.ipynb").unlink()
    model = {"type": "notebook", "content": notebook(["aa"], {})}
    keep_widget_state(model=model, path="nb.ipynb", contents_manager=SimpleNamespace(root_dir=str(tmp_path)))
    assert model["content"]["metadata"]["widgets"][WIDGET_STATE]["state"] == {}  # a new file
