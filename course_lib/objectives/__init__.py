"""course_lib.objectives."""
