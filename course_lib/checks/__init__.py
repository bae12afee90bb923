"""Check functions that grade the notebooks' exercises and give the learner a readable verdict.

Each ``check_*`` runs the learner's function on cases with known answers (computed by
``course_lib``'s own implementation or by hand) and prints ``PASS`` with what was checked, or raises
:class:`ExerciseError` with a verdict: ``"<check>: not yet: fill in ..."`` while the function is still
the starter (it raises ``NotImplementedError`` or returns ``None``), ``"<check>: wrong: ..."`` with what
went wrong, on which input, and a hint otherwise; a wrong solution also fails the test suite. In
Jupyter the verdict shows as one message, without the check's code (see ``verdict.py``). One module
per notebook topic: ``course_lib.checks.text``, ``course_lib.checks.attention``,
``course_lib.checks.shapeworld`` ...
"""

from course_lib.checks.verdict import (  # noqa: F401
    CheckArgumentError, ExerciseError, call_learner, expect, expect_close, not_yet, passed, wrong,
)
