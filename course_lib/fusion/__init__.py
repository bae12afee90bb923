"""course_lib.fusion."""
