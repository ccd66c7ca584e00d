"""The evaluation protocol of the person search literature, reproduced to the digit.

- ``evaluate_search``: mAP and top-1/5/10 (CUHK-SYSU galleries, PRW all-camera and cross-camera,
  GT-box or max-IoU query embeddings, optional CBGM re-scoring).
- ``evaluate_detections``: detection AP and recall with mutual-best IoU matching.
- ``evaluate_pedestrian_detection``: CrowdHuman's MR^-2, AP and recall.
- ``Predictions``, ``save_predictions``, ``load_predictions``: the file a trainer writes and
  ``python -m training.evaluate`` scores.

See ``docs/evaluation.md`` for the protocol and the public scripts' bugs we do not repeat.
"""

from .average_precision import average_precision
from .cbgm import CBGM_PARAMETERS
from .detection import DetectionResult, evaluate_detections, mutual_best_matches
from .miss_rate import (
    FPPI_REFERENCE,
    PedestrianDetectionResult,
    evaluate_pedestrian_detection,
    log_average_miss_rate,
)
from .predictions import (
    FORMAT_VERSION,
    Predictions,
    PredictionsError,
    QueryMode,
    load_predictions,
    save_predictions,
)
from .search import TOP_K, SearchResult, evaluate_search, size_dependent_iou_threshold

__all__ = [
    "CBGM_PARAMETERS",
    "FORMAT_VERSION",
    "FPPI_REFERENCE",
    "TOP_K",
    "DetectionResult",
    "PedestrianDetectionResult",
    "Predictions",
    "PredictionsError",
    "QueryMode",
    "SearchResult",
    "average_precision",
    "evaluate_detections",
    "evaluate_pedestrian_detection",
    "evaluate_search",
    "load_predictions",
    "log_average_miss_rate",
    "mutual_best_matches",
    "save_predictions",
    "size_dependent_iou_threshold",
]
