"""The inference worker: detections and max-IoU queries in one engine pass, the query rule."""

from types import SimpleNamespace

import numpy as np
import pytest

from server.errors import InvalidField, NoPersonDetected
from server.worker import DetectTask, InferenceWorker, QueryTask, max_iou_query
from tests.server.support import scene


class CountingEngine:
    """An engine that records the images of each detect call, passing them to ``engine``."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.manifest = engine.manifest
        self.calls: list[int] = []

    def detect(self, images):
        self.calls.append(len(images))
        return self.engine.detect(images)


def detections(boxes, scores, dim: int = 2) -> SimpleNamespace:
    count = len(boxes)
    embeddings = np.eye(count, dim, dtype=np.float32)
    return SimpleNamespace(
        boxes=np.asarray(boxes, np.float32), scores=np.asarray(scores), embeddings=embeddings
    )


def test_a_max_iou_query_is_what_the_engine_itself_embeds(engine):
    """Alone in its batch, the worker's query goes through the same detection pass as the
    engine's own embed_query, and picks the same detection: the same embedding, exactly."""
    image = scene(1)
    worker = InferenceWorker(engine)
    for box in ((30.0, 10.0, 70.0, 90.0), (0.0, 0.0, 128.0, 96.0)):
        [query] = worker([QueryTask(image, box)])
        np.testing.assert_array_equal(query.embedding, engine.embed_query(image, box))
        assert query.method == "max_iou_detection"


def test_detections_and_queries_share_one_engine_pass(engine):
    counting = CountingEngine(engine)
    images = [scene(seed) for seed in (1, 2, 3)]
    tasks = [
        DetectTask(images[0]),
        QueryTask(images[1], (10.0, 10.0, 50.0, 90.0)),
        DetectTask(images[2]),
    ]

    results = InferenceWorker(counting)(tasks)

    assert counting.calls == [3]
    alone = engine.detect([images[0]])[0]
    np.testing.assert_allclose(results[0].boxes, alone.boxes, atol=1e-3)
    np.testing.assert_allclose(results[0].embeddings, alone.embeddings, atol=1e-4)
    assert results[1].method == "max_iou_detection"
    assert len(results[2].scores) > 0


def test_the_detection_overlapping_the_box_most_is_the_query():
    """Box (6, 6, 15, 15), area 81. Detection 1 (5, 5, 15, 15), area 100, overlaps it in 9 x 9
    = 81: IoU 81 / 100 = 0.81. Detection 0 (0, 0, 10, 10) overlaps 4 x 4 = 16: IoU 16 / 165."""
    found = detections([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], [0.9, 0.8, 0.7], dim=3)
    query = max_iou_query(found, (6.0, 6.0, 15.0, 15.0))
    assert query.box == (5.0, 5.0, 15.0, 15.0)
    assert query.iou == pytest.approx(0.81)
    assert query.det_score == pytest.approx(0.8)
    np.testing.assert_array_equal(query.embedding, [0, 1, 0])


def test_a_box_overlapping_nothing_still_takes_the_first_best_detection():
    """All IoUs are 0: the arg-max is the first detection, the highest scored (AlignPS)."""
    found = detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8])
    query = max_iou_query(found, (50.0, 50.0, 60.0, 60.0))
    assert (query.box, query.iou) == ((0.0, 0.0, 10.0, 10.0), 0.0)


def test_no_detection_is_an_error_of_that_query_only():
    assert isinstance(max_iou_query(detections([], []), (0.0, 0.0, 5.0, 5.0)), NoPersonDetected)


class RoIEngine:
    """A model that embeds given boxes: embed_query returns the box's corner as a vector."""

    info = SimpleNamespace(name="roi", fingerprint="f", dim=2, backend="none", device="cpu")
    manifest = SimpleNamespace(embeds_boxes=True)

    def __init__(self) -> None:
        self.detected: list[int] = []

    def detect(self, images):
        self.detected.append(len(images))
        return [detections([[0, 0, 1, 1]], [0.5]) for _ in images]

    def embed_query(self, image, box=None):
        if box[0] == box[2]:
            raise ValueError("box is empty")
        return np.asarray(box[:2], np.float32)


def test_a_roi_model_embeds_each_query_box_itself():
    engine = RoIEngine()
    tasks = [
        QueryTask(scene(1), (3.0, 4.0, 10.0, 10.0)),
        DetectTask(scene(2)),
        QueryTask(scene(3), (5.0, 5.0, 5.0, 9.0)),
    ]
    embedded, detected, refused = InferenceWorker(engine)(tasks)
    assert engine.detected == [1]  # only the DetectTask went through detection
    np.testing.assert_array_equal(embedded.embedding, [3, 4])
    assert (embedded.method, embedded.box, embedded.iou) == ("box", (3.0, 4.0, 10.0, 10.0), 1.0)
    assert len(detected.scores) == 1
    assert isinstance(refused, InvalidField) and "box is empty" in refused.message
