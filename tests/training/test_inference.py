"""Evaluation glue: a model's outputs become Predictions in original pixels and metrics.

The model here is an oracle for a tiny PRW-like split whose persons are solid rectangles, one
colour per person: it finds each known colour and embeds it as a one-hot vector, so every number
it should score can be worked out by hand.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from models.preprocess import PreprocessConfig
from models.types import Detections
from training.config import ConfigError, TrainConfig
from training.datasets import PersonSearchSplit, Query, SceneAnnotation
from training.evaluation import load_predictions
from training.inference import detections_to_original, evaluate_model, score_predictions

BACKGROUND = (90, 90, 90)
RED, GREEN, BLUE = (220, 40, 40), (40, 200, 60), (50, 70, 230)
YELLOW, MAGENTA = (230, 220, 40), (200, 50, 200)
PALETTE = [RED, GREEN, BLUE, YELLOW, MAGENTA]
PID_COLORS = {0: RED, 1: GREEN, 2: BLUE}
UNLABELED_COLORS = [YELLOW, MAGENTA]

# (name, [(colour, x, y)]): 10 x 20 persons in 60 x 40 frames; the camera is the digit after c.
SCENES = [
    ("c1s1_000001", [(RED, 5, 5), (GREEN, 30, 10)]),
    ("c2s1_000002", [(RED, 40, 15), (YELLOW, 10, 10)]),
    ("c3s1_000003", [(GREEN, 20, 12), (BLUE, 45, 5)]),
    ("c1s1_000004", [(BLUE, 5, 15), (MAGENTA, 30, 5)]),
    ("c2s1_000005", [(RED, 25, 18), (BLUE, 45, 18)]),
]
# Each query: its pid and the scene it is cropped from.
QUERIES = [(0, "c1s1_000001"), (1, "c1s1_000001"), (2, "c3s1_000003")]

# Upscaling by 2 (short side 40 -> 80) makes a wrong mapping back to original pixels visible.
PREPROCESS = PreprocessConfig(min_size=80, max_size=200, size_divisor=32)


def build_split(root: Path, dataset: str = "prw") -> PersonSearchSplit:
    images = []
    for name, persons in SCENES:
        pixels = np.full((40, 60, 3), BACKGROUND, dtype=np.uint8)
        boxes, pids = [], []
        for color, x, y in persons:
            pixels[y : y + 20, x : x + 10] = color
            boxes.append([x, y, x + 10, y + 20])
            pid = next((p for p, c in PID_COLORS.items() if c == color), -1)
            pids.append(pid if dataset == "prw" else -1)
        path = root / f"{name}.png"  # lossless, so colours stay exact
        Image.fromarray(pixels).save(path)
        annotation = SceneAnnotation(
            name, path, np.array(boxes, np.float32), np.array(pids), camera=int(name[1])
        )
        images.append(annotation)
    by_name = {a.name: a for a in images}
    queries = []
    if dataset == "prw":
        for pid, name in QUERIES:
            box = by_name[name].boxes[list(by_name[name].pids).index(pid)]
            queries.append(Query(pid, name, box, camera=by_name[name].camera))
    return PersonSearchSplit(dataset, "test", root, images, queries)


class ColourOracle(nn.Module):
    """Detects solid rectangles of known colours; a colour's embedding is its one-hot vector.
    It records the (batch shape, image_sizes) of every call."""

    def __init__(self, colours: list[tuple[int, int, int]], blind_to=()) -> None:
        super().__init__()
        self.preprocess = PREPROCESS
        self.colours = torch.tensor([c for c in colours], dtype=torch.float32)
        self.seen = [i for i, c in enumerate(colours) if c not in blind_to]
        self.calls: list[tuple[tuple[int, ...], Tensor | None]] = []

    def _pixels(self, images: Tensor) -> Tensor:
        mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        return (images * std + mean) * 255

    def forward(self, images: Tensor, *, image_sizes: Tensor | None = None) -> Detections:
        self.calls.append((tuple(images.shape), image_sizes))
        pixels = self._pixels(images)
        slots = len(self.colours)
        boxes = torch.zeros(len(images), slots, 4)
        scores = torch.zeros(len(images), slots)
        embeddings = torch.zeros(len(images), slots, slots)
        for b in range(len(images)):
            found = 0
            for c in self.seen:
                mask = ((pixels[b] - self.colours[c].view(3, 1, 1)).abs() < 10).all(0)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes[b, found] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    scores[b, found] = 0.9
                    embeddings[b, found, c] = 1.0
                    found += 1
        return Detections(boxes, scores, embeddings)


class ColourOracleWithBoxes(ColourOracle):
    def embed_boxes(
        self, images: Tensor, boxes: list[Tensor], *, image_sizes: Tensor | None = None
    ) -> Tensor:
        self.calls.append((tuple(images.shape), image_sizes))
        pixels = self._pixels(images)
        vectors = []
        for b, image_boxes in enumerate(boxes):
            for x1, y1, x2, y2 in image_boxes.tolist():
                centre = pixels[b, :, int((y1 + y2) / 2), int((x1 + x2) / 2)]
                nearest = int((self.colours - centre).abs().sum(1).argmin())
                vectors.append(torch.eye(len(self.colours))[nearest])
        return torch.stack(vectors)


def config(**eval_fields) -> TrainConfig:
    return TrainConfig(eval={"det_thresh": 0.5, **eval_fields})


def test_detections_map_back_to_original_pixels_and_drop_unused_slots():
    # Input pixels at scale (2, 4): x halves, y quarters. Slot 2 is unused (score 0), slot 1 is
    # below min_score; slot 0 pokes out of the 30 x 20 image and is clipped to it.
    boxes = torch.tensor([[10.0, 8.0, 70.0, 100.0], [2.0, 4.0, 6.0, 8.0], [0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([0.8, 0.3, 0.0])
    embeddings = torch.eye(3)
    output = detections_to_original(boxes, scores, embeddings, (2.0, 4.0), (30, 20), 0.5)
    np.testing.assert_allclose(output.detections, [[5.0, 2.0, 30.0, 20.0, 0.8]])
    np.testing.assert_array_equal(output.embeddings, [[1.0, 0.0, 0.0]])
    assert output.size == (30, 20)


def test_a_perfect_model_scores_perfectly_in_max_iou_mode(tmp_path):
    split = build_split(tmp_path)
    model = ColourOracle(PALETTE)
    metrics = evaluate_model(model, config(query_mode="max_iou"), torch.device("cpu"), split)
    # Every query identity appears in another frame of another camera, each found with the
    # query's own one-hot embedding (similarity 1, everything else 0).
    for name in ("mAP", "top1", "top5", "cross_camera_mAP", "cross_camera_top1"):
        assert metrics[name] == 1.0, name
    assert metrics["det_ap"] == 1.0
    assert metrics["det_recall"] == 1.0
    assert metrics["num_queries"] == 3
    assert metrics["low_iou_queries"] == 0


def test_a_perfect_model_scores_perfectly_in_gt_box_mode(tmp_path):
    split = build_split(tmp_path)
    model = ColourOracleWithBoxes(PALETTE)
    metrics = evaluate_model(model, config(query_mode="gt_box"), torch.device("cpu"), split)
    assert metrics["mAP"] == 1.0
    assert metrics["top1"] == 1.0
    assert "low_iou_queries" not in metrics  # only meaningful when queries pick a detection


def test_the_model_is_told_the_size_of_each_image_in_its_padded_batch(tmp_path):
    """The 40 x 60 frames are upscaled to 80 x 120 and padded to 96 x 128: the model gets
    image_sizes (80, 120) for every image, to detect and to embed query boxes."""
    model = ColourOracleWithBoxes(PALETTE)
    settings = config(query_mode="gt_box", batch_size=2)
    evaluate_model(model, settings, torch.device("cpu"), build_split(tmp_path))
    assert len(model.calls) == 3 + 2  # 5 frames and 3 queries, 2 at a time
    for shape, image_sizes in model.calls:
        assert shape[2:] == (96, 128)
        assert image_sizes.tolist() == [[80, 120]] * shape[0]


def test_a_model_blind_to_one_person_loses_exactly_that_query_and_its_boxes(tmp_path):
    split = build_split(tmp_path)
    model = ColourOracle(PALETTE, blind_to=[BLUE])
    metrics = evaluate_model(model, config(query_mode="max_iou"), torch.device("cpu"), split)
    # Blue (pid 2) is in 3 of the 10 person boxes: recall 7/10, and every detection is right,
    # so AP = precision 1 x recall 0.7. Its query picks the green person next to it (IoU 0 with
    # the query box), which finds no blue person: AP 0 for that query, 1 for the other two.
    assert metrics["det_recall"] == pytest.approx(0.7)
    assert metrics["det_ap"] == pytest.approx(0.7)
    assert metrics["mAP"] == pytest.approx(2 / 3)
    assert metrics["top1"] == pytest.approx(2 / 3)
    assert metrics["low_iou_queries"] == 1


def test_gt_box_mode_refuses_a_model_without_embed_boxes(tmp_path):
    split = build_split(tmp_path)
    with pytest.raises(ConfigError, match="gt_box needs a model with embed_boxes"):
        evaluate_model(
            ColourOracle(PALETTE), config(query_mode="gt_box"), torch.device("cpu"), split
        )


def test_pedestrian_detection_is_scored_with_miss_rate(tmp_path):
    split = build_split(tmp_path, dataset="crowdhuman")
    metrics = evaluate_model(ColourOracle(PALETTE), config(), torch.device("cpu"), split)
    # Every person found, no false positive: nothing is missed at any FPPI.
    assert metrics["mr2"] == 0.0
    assert metrics["recall"] == 1.0
    assert set(metrics) == {"mr2", "ap", "recall"}


def test_saved_predictions_score_the_same_when_reloaded(tmp_path):
    split = build_split(tmp_path)
    cfg = config(query_mode="max_iou")
    path = tmp_path / "predictions.npz"
    model = ColourOracle(PALETTE, blind_to=[GREEN])
    metrics = evaluate_model(model, cfg, torch.device("cpu"), split, predictions_path=path)
    assert score_predictions(split, load_predictions(path), cfg.eval) == metrics


def test_evaluation_restores_the_models_training_mode(tmp_path):
    split = build_split(tmp_path)
    model = ColourOracle(PALETTE)
    model.train()
    evaluate_model(model, config(), torch.device("cpu"), split)
    assert model.training


def test_a_confidence_weighted_model_stores_its_embeddings_times_the_scores(tmp_path):
    """SeqNet's search similarity is the cosine times the detection score: the predictions of a
    model that says so hold score-weighted embeddings (the oracle scores 0.9); query boxes stay
    unit vectors, so every similarity is 0.9 where the plain model's is 1."""
    split = build_split(tmp_path)
    path = tmp_path / "predictions.npz"
    model = ColourOracleWithBoxes(PALETTE)
    model.confidence_weighted_similarity = True
    cfg = config(query_mode="gt_box")
    metrics = evaluate_model(model, cfg, torch.device("cpu"), split, predictions_path=path)
    predictions = load_predictions(path)
    for name, embeddings in predictions.embeddings.items():
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 0.9, err_msg=name)
    np.testing.assert_allclose(np.linalg.norm(predictions.query_embeddings, axis=1), 1.0)
    assert metrics["mAP"] == 1.0  # one weight for every detection ranks them as before
