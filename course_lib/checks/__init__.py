"""Check functions that grade the notebooks' exercises and give the learner a readable verdict.

Each ``check_*`` runs the learner's function on cases with known answers (computed by
``course_lib``'s own implementation or by hand), prints ``PASS`` with what was checked, or
raises :class:`ExerciseError` saying what went wrong and on which input, so a wrong solution
also fails the test suite. One module per notebook topic: ``course_lib.checks.text``,
``course_lib.checks.attention``, ``course_lib.checks.shapeworld`` ...
"""

from course_lib.checks.verdict import ExerciseError, expect, expect_close, passed  # noqa: F401
