"""The course in a real browser: JupyterLab driven by Playwright and Chromium.

For every notebook in ``notebooks/`` whose built copy displays a widget:

* ``test_first_open_shows_saved_widgets``: opened as a learner first opens it, without running
  anything, its widgets are drawn from the stored state as widgets (not as ``VBox(children=...)``
  text, not as "Error displaying widget"); they still are after a save (Ctrl+S) and a reload.
* ``test_run_all_renders_and_widgets_respond``: at ``SCALE = "smoke"``, Run > Run All Cells ends
  with no error except the unsolved exercises, every figure drawn, every widget drawn as a widget,
  and moving a widget's control changes what it shows; saved, and reopened with a new kernel,
  the new widgets are drawn from the saved state.

Both also require a browser console without errors. JupyterLab is started by
``tools/course_lab.py``, as ``./course.sh lab`` starts it, so these tests prove what learners get.
Everything runs on copies in a temporary folder, with JupyterLab's config, data, settings and
workspaces there too; only 127.0.0.1 is reached. Screenshots go to ``test-artifacts/browser/<notebook>-<step>.png`` (the final state
always, the failing state on failure). Select these tests with ``pytest -m browser``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  # every host name but 127.0.0.1 fails to resolve: the page can reach nothing else
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
NO_CHROMIUM = ("browser test skipped: no chromium found; install it with `apt-get install chromium` "
               "(Debian/Ubuntu) to enable it")
NO_PLAYWRIGHT = ("browser test skipped: Playwright is not importable; install it with "
                 "`pip install -r requirements.txt` (./course.sh test does) to enable it")
# Browser console errors that JupyterLab itself logs and a course cannot avoid: exact patterns,
# each with the reason it is allowed. Anything else fails the test.
ALLOWED_CONSOLE_ERRORS: list[re.Pattern] = []
# A container widget's text form, shown when it cannot be drawn (e.g. "VBox(children=(HBox(...")
WIDGET_AS_TEXT = re.compile(r"\b[A-Z]\w*\(children=")
LOAD_TIMEOUT_MS = 120_000
RUN_TIMEOUT_S = 600
STATE_TIMEOUT_MS = 60_000


# ---------------------------------------------------------------------------- which notebooks


def has_widget_output(path: Path) -> bool:
    """Whether the built notebook at ``path`` displays a widget (an output of the widget mime type)."""
    nb = nbformat.read(path, as_version=4)
    return any(WIDGET_MIME in out.get("data", {}) for cell in code_cells(nb) for out in cell.outputs)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def count_outputs(nb, mimes: tuple[str, ...]) -> int:
    """How many cell outputs of ``nb`` carry one of ``mimes``."""
    return sum(any(m in out.get("data", {}) for m in mimes) for cell in code_cells(nb) for out in cell.outputs)


WIDGET_NOTEBOOKS = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if has_widget_output(p))


# ---------------------------------------------------------------------------- the browser


def find_chromium() -> str | None:
    """``/usr/bin/chromium`` or the first of chromium, chromium-browser, google-chrome on PATH."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium from the system (Playwright's own download is not needed)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(NO_PLAYWRIGHT)
    executable = find_chromium()
    if executable is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    """One browser page on one notebook, with the console errors seen so far."""

    page: object
    name: str
    errors: list[str] = field(default_factory=list)

    def screenshot(self, step: str) -> Path:
        """A full-page screenshot ``test-artifacts/browser/<name>-<step>.png``; returns its path."""
        path = ARTIFACTS / f"{self.name}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def new_tab(browser, lab):
    """``new_tab(name)``: a fresh browser context and page that records console errors; at the end
    the pages close and their kernels shut down."""
    contexts = []

    def make(name: str) -> Tab:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)
        tab = Tab(context.new_page(), name)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.glob(f"{name}-*.png"):  # a previous run's screenshots of this test
            old.unlink()
        tab.page.on("console", lambda msg: msg.type == "error" and tab.errors.append(msg.text))
        tab.page.on("pageerror", lambda error: tab.errors.append(f"page error: {error}"))
        tab.page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?" on reload
        return tab

    yield make
    for context in contexts:
        context.close()
    end_sessions(lab)


@contextmanager
def step(tab: Tab, name: str):
    """Run one step and print its time; on any failure, save a screenshot and name it in the
    assertion message."""
    start = time.monotonic()
    try:
        yield
    except Exception as error:  # noqa: BLE001 - a timeout is as much a failure as an assertion
        try:
            shot = f"screenshot: {tab.screenshot(f'{name}-FAILED')}"
        except Exception as screenshot_error:  # noqa: BLE001 - e.g. the page crashed
            shot = f"no screenshot: {screenshot_error}"
        raise AssertionError(f"{tab.name}, step {name!r}: {error}\n  {shot}") from error
    finally:
        print(f"{tab.name}: {name} {time.monotonic() - start:.1f} s")


# ---------------------------------------------------------------------------- JupyterLab


@dataclass
class Lab:
    """A JupyterLab server on 127.0.0.1 serving a temporary copy of the course's notebooks."""

    url: str
    token: str
    root: Path

    def notebook_url(self, path: Path, workspace: str) -> str:
        """The notebook's address in its own workspace, so no other tab is restored with it."""
        return f"{self.url}/lab/workspaces/{workspace}/tree/{path.relative_to(self.root).as_posix()}?token={self.token}"

    def copy(self, name: str, prefix: str) -> Path:
        """A working copy ``<prefix>-<name>`` next to the (trusted) notebook: autosave may rewrite it."""
        source = self.root / "notebooks" / name
        target = source.with_name(f"{prefix}-{name}")
        shutil.copyfile(source, target)
        return target

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lab_environment(base: Path) -> dict[str, str]:
    """The environment with JupyterLab's (and IPython's) config, data, settings, workspaces and
    runtime dirs under ``base``, so nothing of the user's is read or written."""
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTERLAB_SETTINGS_DIR", "user-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")]:
        env[var] = str(base / sub)
    env.pop("JUPYTER_TOKEN", None)
    env["HF_HUB_OFFLINE"] = "1"  # the kernels download nothing
    # no "get Jupyter news?" toast over the notebook (and no request for it)
    notification = base / "user-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return env


def lab_command(port: int, token: str, root: Path) -> list[str]:
    """``tools/course_lab.py``, the learners' JupyterLab, on 127.0.0.1:``port`` serving ``root``."""
    command = [sys.executable, str(ROOT / "tools" / "course_lab.py"), "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}",
               # nothing but 127.0.0.1: no news feed, no update check, no PyPI extension listing
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]
    return command + (["--allow-root"] if os.geteuid() == 0 else [])


def wait_until_answering(lab: Lab, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            lab.api("GET", "/api/status")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def end_sessions(lab: Lab) -> None:
    """Close every notebook session and shut its kernel down."""
    for session in lab.api("GET", "/api/sessions"):
        lab.api("DELETE", f"/api/sessions/{session['id']}")


def stop_lab(lab: Lab, process: subprocess.Popen) -> None:
    """Shut the kernels down, then the server's whole process group."""
    try:
        end_sessions(lab)
    except OSError:
        pass
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    """The learners' JupyterLab (``tools/course_lab.py``) on a free port with a random token,
    serving a copy of ``notebooks/``."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = lab_environment(base)
    port, token, log = free_port(), secrets.token_hex(16), base / "jupyterlab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(lab_command(port, token, root), env=env, cwd=root,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        wait_until_answering(server, process, log)
        yield server
    finally:
        stop_lab(server, process)


# ---------------------------------------------------------------------------- driving a notebook

# In the page: the notebook's cells, their prompts, outputs and the kernel state in the status bar.
PANEL = ".jp-NotebookPanel"
PROMPTS_JS = f"""() => [...document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputPrompt')]
                       .map(p => p.textContent.trim())"""
STATUS_JS = "() => document.querySelector('#jp-main-statusbar')?.textContent ?? ''"


def open_notebook(tab: Tab, lab: Lab, path: Path, workspace: str) -> None:
    """Open ``path`` and wait until all its cells are on the page and its kernel is idle."""
    tab.page.goto(lab.notebook_url(path, workspace), timeout=LOAD_TIMEOUT_MS)
    wait_notebook_shown(tab, path)


def wait_notebook_shown(tab: Tab, path: Path) -> None:
    cells = len(nbformat.read(path, as_version=4).cells)
    tab.page.wait_for_function(f"n => document.querySelectorAll('{PANEL} .jp-Cell').length === n", arg=cells,
                               timeout=LOAD_TIMEOUT_MS)
    wait_kernel_idle(tab)


def wait_kernel_idle(tab: Tab) -> None:
    """The status bar reads "Python 3 (ipykernel) | Idle" (the toolbar says idle before a kernel exists)."""
    tab.page.wait_for_function(f"() => /\\|\\s*Idle/.test(({STATUS_JS})())", timeout=LOAD_TIMEOUT_MS)


def run_all_cells(tab: Tab) -> None:
    """Run > Run All Cells, as a learner does."""
    tab.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    tab.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def wait_run_ended(tab: Tab) -> list[str]:
    """Wait until Run All has ended: no prompt shows ``[*]``, one has a number, and the kernel is
    idle, twice in a row a second apart. Returns the code cells' prompts."""
    deadline, ended_before = time.monotonic() + RUN_TIMEOUT_S, False
    while time.monotonic() < deadline:
        prompts = tab.page.evaluate(PROMPTS_JS)
        ended = ("[*]:" not in prompts and any(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
                 and re.search(r"\|\s*Idle", tab.page.evaluate(STATUS_JS)) is not None)
        if ended and ended_before:
            return prompts
        ended_before = ended
        time.sleep(1)
    raise TimeoutError(f"Run All did not end within {RUN_TIMEOUT_S} s; prompts: {prompts}")


def check_all_ran(prompts: list[str], exercise: list[bool]) -> None:
    """Every code cell but the exercises has a numbered prompt (an unsolved exercise stops Run All,
    so the exercises after the first may stay unrun; they come last)."""
    assert len(prompts) == len(exercise), f"{len(prompts)} code cells on the page, {len(exercise)} in the notebook"
    unrun = [i for i, (p, ex) in enumerate(zip(prompts, exercise)) if not ex and not re.fullmatch(r"\[\d+\]:", p)]
    assert not unrun, f"Run All stopped before code cells {unrun} (prompts {[prompts[i] for i in unrun]})"


def save(tab: Tab, path: Path) -> nbformat.NotebookNode:
    """Ctrl+S; wait until the file is rewritten (JupyterLab's backup copy ``.~<name>``, kept while
    it writes, is gone); return what was saved."""
    before, backup = path.stat().st_mtime_ns, path.with_name(f".~{path.name}")
    tab.page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current").click()  # focus the notebook
    tab.page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before or backup.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ctrl+S did not save {path.name} within 30 s")
        time.sleep(0.2)
    return nbformat.read(path, as_version=4)


# ---------------------------------------------------------------------------- what must be seen

# A cell's own outputs (not those nested in an Output widget); a widget is drawn into one as a
# `.jupyter-widgets` element, its text form is a plain-text output.
CELL_OUTPUT = ".jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output"
WIDGET_OUTPUT = f"{CELL_OUTPUT}:has(> .jupyter-widgets)"
WIDGETS_JS = f"""() => [...document.querySelectorAll('{PANEL} .jp-OutputArea-output')].map(o => ({{
    widget: o.matches('{WIDGET_OUTPUT}'),
    text: o.textContent.slice(0, 300),
}}))"""
IMAGES_JS = f"""() => [...document.querySelectorAll('{PANEL} .jp-OutputArea-output img')].map(i => ({{
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, src: i.src.slice(0, 60),
}}))"""


def widget_problems(outputs: list[dict], expected: int) -> list[str]:
    """What is wrong with the widget outputs on the page (empty when all ``expected`` are drawn)."""
    problems = [f"shown as text: {o['text'][:120]!r}" for o in outputs if WIDGET_AS_TEXT.search(o["text"])]
    problems += [f"error: {o['text'][:120]!r}" for o in outputs if "Error displaying widget" in o["text"]]
    drawn = sum(o["widget"] for o in outputs)
    if drawn != expected:
        problems.append(f"{drawn} of {expected} widget outputs drawn as widgets")
    return problems


def check_widgets_drawn(tab: Tab, expected: int) -> None:
    """Every widget output is drawn as a widget: never its text form, never an error."""
    deadline, problems = time.monotonic() + STATE_TIMEOUT_MS / 1000, ["not checked"]
    while time.monotonic() < deadline:
        problems = widget_problems(tab.page.evaluate(WIDGETS_JS), expected)
        if not problems:
            return
        time.sleep(0.5)
    raise AssertionError("widgets not drawn: " + "; ".join(problems))


def check_figures_drawn(tab: Tab, expected: int) -> None:
    """Every image output is an <img> that loaded with a nonzero natural size."""
    deadline, images = time.monotonic() + STATE_TIMEOUT_MS / 1000, []
    while time.monotonic() < deadline:
        images = tab.page.evaluate(IMAGES_JS)
        if len(images) >= expected and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images):
            return
        time.sleep(0.5)
    broken = [i for i in images if not (i["complete"] and i["width"] > 0)]
    raise AssertionError(f"{len(images)} images on the page for {expected} image outputs; not drawn: {broken}")


def check_state_saved(nb) -> None:
    """The saved notebook holds the state of every widget its outputs show."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {})
    shown = {out.data[WIDGET_MIME]["model_id"] for cell in code_cells(nb) for out in cell.outputs
             if WIDGET_MIME in out.get("data", {})}
    assert shown <= set(state), f"the saved notebook lacks the state of widgets {sorted(shown - set(state))}"


def is_unsolved_exercise(cell, output) -> bool:
    """An unsolved starter fails on purpose: its cell is tagged ``exercise`` and the error is the
    check's "not yet" verdict (``ExerciseError: check_x: not yet: fill in ...``) or the starter's own
    NotImplementedError. A "wrong" verdict or any other error is a bug in the notebook."""
    if "exercise" not in cell.metadata.get("tags", []):
        return False
    return output.ename == "NotImplementedError" or (
        output.ename == "ExerciseError" and re.match(r"\w+: not yet\b", output.evalue) is not None)


def check_errors(nb) -> None:
    """No error output but the unsolved exercises'."""
    errors = [f"cell {i}: {out.ename}: {out.evalue[:200]}" for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error" and not is_unsolved_exercise(cell, out)]
    assert not errors, "errors besides the unsolved exercises:\n  " + "\n  ".join(errors)


def check_console(tab: Tab) -> None:
    """No error in the browser console but the allowed JupyterLab-internal ones."""
    errors = [e for e in tab.errors if not any(p.search(e) for p in ALLOWED_CONSOLE_ERRORS)]
    assert not errors, "browser console errors:\n  " + "\n  ".join(errors)


# ---------------------------------------------------------------------------- interacting

# The text a widget shows (images and HTML readouts, not its controls): what an interaction must change.
SHOWN_JS = """root => [...root.querySelectorAll('img')].map(i => i.src).join('|') + '|' +
    [...root.querySelectorAll('.widget-html-content, .widget-output')].map(e => e.textContent).join('|')"""


def move_a_control(widget) -> str:
    """Move the widget's first slider (arrow key), else change a dropdown, else type into a text box."""
    slider = widget.locator(".widget-slider .noUi-handle")
    dropdown = widget.locator(".widget-dropdown select")
    text = widget.locator(".widget-text input, .widget-textarea textarea")
    if slider.count():
        slider.first.focus()
        slider.first.press("ArrowRight")
        return "moved a slider"
    if dropdown.count():
        options = dropdown.first.locator("option").all_text_contents()
        current = dropdown.first.evaluate("s => s.options[s.selectedIndex].text")
        dropdown.first.select_option(label=next(o for o in options if o != current))
        return "changed a dropdown"
    if text.count():
        text.first.fill("a red circle")
        text.first.press("Enter")
        return "typed into a text box"
    raise AssertionError("the widget has no slider, dropdown or text box to move")


def check_widgets_respond(tab: Tab) -> None:
    """For each widget on the page, moving one of its controls changes what it shows."""
    widgets = tab.page.locator(f"{PANEL} {WIDGET_OUTPUT}")
    for k in range(widgets.count()):
        widget = widgets.nth(k)
        scroll_to_top(tab, widget)
        before = widget.evaluate(SHOWN_JS)
        action = move_a_control(widget)
        try:
            tab.page.wait_for_function(f"([root, before]) => ({SHOWN_JS})(root) !== before", arg=[
                widget.element_handle(), before], timeout=STATE_TIMEOUT_MS)
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"widget {k}: {action}, but what it shows did not change") from error
        scroll_to_top(tab, widget)
        tab.screenshot(f"widget{k}-after-interaction")


# ---------------------------------------------------------------------------- the tests


def smoke_copy(lab: Lab, name: str) -> Path:
    """A working copy at ``SCALE = "smoke"`` (when the notebook knows it), outputs and widget state
    cleared, so whatever shows after Run All comes from this run."""
    path = lab.copy(name, "run")
    nb = nbformat.read(path, as_version=4)
    knows_smoke = any(re.search(r"""["']smoke["']\s*:""", cell.source) for cell in code_cells(nb))
    for cell in code_cells(nb):
        cell.outputs, cell.execution_count = [], None
        if knows_smoke and "parameters" in cell.metadata.get("tags", []):
            cell.source = 'SCALE = "smoke"  # set by tests/test_browser.py'
    nb.metadata.pop("widgets", None)
    if not knows_smoke:
        import warnings
        warnings.warn(f"{name} has no smoke scale yet: the browser test runs it at its own SCALE", stacklevel=1)
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("name", WIDGET_NOTEBOOKS)
def test_first_open_shows_saved_widgets(lab, new_tab, name):
    """Opened without running, the built notebook shows its saved widgets and figures; after a
    save and a reload it still does (the widget state survived the save)."""
    path = lab.copy(name, "open")
    built = nbformat.read(path, as_version=4)
    widgets, images = count_outputs(built, (WIDGET_MIME,)), count_outputs(built, IMAGE_MIMES)
    tab = new_tab(f"{Path(name).stem}-first-open")
    with step(tab, "open"):
        open_notebook(tab, lab, path, workspace=path.stem)
    with step(tab, "widgets-on-open"):
        check_widgets_drawn(tab, widgets)
        check_figures_drawn(tab, images)
        scroll_to_first_widget(tab)
        tab.screenshot("opened")
    with step(tab, "save"):
        check_state_saved(save(tab, path))
    with step(tab, "reload"):
        tab.page.reload(timeout=LOAD_TIMEOUT_MS)
        wait_notebook_shown(tab, path)
        check_widgets_drawn(tab, widgets)
        check_figures_drawn(tab, images)
        scroll_to_first_widget(tab)
    with step(tab, "console"):
        tab.screenshot("final")
        check_console(tab)


@pytest.mark.parametrize("name", WIDGET_NOTEBOOKS)
def test_run_all_renders_and_widgets_respond(lab, new_tab, name):
    """Run All at smoke scale: only the unsolved exercises fail, every figure and widget is drawn,
    each widget answers a moved control; saved and reopened with a new kernel, the widgets are
    drawn from the saved state."""
    path = smoke_copy(lab, name)
    exercise = ["exercise" in c.metadata.get("tags", []) for c in code_cells(nbformat.read(path, as_version=4))]
    tab = new_tab(f"{Path(name).stem}-run-all")
    with step(tab, "open"):
        open_notebook(tab, lab, path, workspace=path.stem)
    with step(tab, "run-all"):
        run_all_cells(tab)
        prompts = wait_run_ended(tab)
        ran = save(tab, path)
    with step(tab, "errors"):
        check_errors(ran)
        check_all_ran(prompts, exercise)
    with step(tab, "figures-and-widgets"):
        check_figures_drawn(tab, count_outputs(ran, IMAGE_MIMES))
        widgets = count_outputs(ran, (WIDGET_MIME,))
        assert widgets > 0, "Run All displayed no widget"
        check_widgets_drawn(tab, widgets)
    with step(tab, "interaction"):
        check_widgets_respond(tab)
    with step(tab, "reopen-with-new-kernel"):
        saved = save(tab, path)
        check_state_saved(saved)
        end_sessions(lab)  # the widgets now live only in the saved file
        tab.page.reload(timeout=LOAD_TIMEOUT_MS)
        wait_notebook_shown(tab, path)
        check_widgets_drawn(tab, count_outputs(saved, (WIDGET_MIME,)))
        scroll_to_first_widget(tab)
    with step(tab, "console"):
        tab.screenshot("final")
        check_console(tab)


def scroll_to_first_widget(tab: Tab) -> None:
    scroll_to_top(tab, tab.page.locator(f"{PANEL} {WIDGET_OUTPUT}").first)


def scroll_to_top(tab: Tab, element) -> None:
    """Bring ``element`` to the top of the notebook for a screenshot (again, as the cells above it
    are laid out only when they come into view, and move it)."""
    for _ in range(3):
        element.evaluate("e => e.scrollIntoView({block: 'start'})")
        tab.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        time.sleep(0.3)
