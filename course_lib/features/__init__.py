"""course_lib.features."""
