"""ShapeWorld, the synthetic world every notebook trains on, its task datasets and collation,
and readers/writers for real data (webdataset shards)."""

from course_lib.data.shapeworld import Scene, SceneObject, ShapeWorld, WorldConfig  # noqa: F401
from course_lib.data.simulated_detector import DetectorConfig, Detections  # noqa: F401
