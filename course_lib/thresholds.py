"""Learning thresholds in the notebooks, and the ``smoke`` scale the test harness runs them at.

Every notebook asserts that its model learned: a measured quality well above the chance level
printed beside it. ``assert_learned`` is that assertion. The test command runs the student
notebooks (``notebooks/``) at ``SCALE = "smoke"``: the same code path with a few training steps,
injected by the test harness into the ``parameters`` cell (never written into the notebook a learner
opens). A smoke run trains too little to learn, so there the threshold is reported, not asserted;
the ``solutions/`` twins assert every threshold at full scale.
"""

from __future__ import annotations

SCALES = ("smoke", "cpu", "gpu")


def assert_learned(condition: bool, message: str, scale: str) -> None:
    """Raise ``AssertionError(message)`` unless ``condition`` holds; at ``scale == "smoke"`` only
    say that the threshold was not checked.

    ``message`` should name the measure, its value, the threshold and the chance level.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not valid; expected one of {list(SCALES)}")
    if scale == "smoke":
        print(f"(smoke run, a few steps: the learning threshold is not asserted; it reads: {message})")
        return
    if not condition:
        raise AssertionError(message)
