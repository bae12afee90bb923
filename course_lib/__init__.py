"""course_lib: the library grown by the notebooks of *Vision-Language Pretraining from Scratch*.

The layout follows the three questions every VLP model answers:

- ``course_lib.data``        ShapeWorld (the synthetic world every notebook trains on) and task datasets
- ``course_lib.features``    how text, images and video become vectors
- ``course_lib.fusion``      where and how the two modalities interact
- ``course_lib.objectives``  which losses teach the alignment
- ``course_lib.models``      one file per system: features + fusion + objectives + heads

plus ``nn`` (attention and transformer blocks), ``train``, ``evaluate``, ``viz`` and ``widgets``.
"""

__version__ = "0.1.0"

from course_lib.utils import seed_everything, get_device  # noqa: F401
