"""The search metric (mAP, top-k) of the person search protocol, on cases worked out by hand.

Most cases use 1-D embeddings and a query embedding of [1], so that a detection's embedding *is*
its similarity to the query: the numbers in the tests read directly as similarities.
"""

from pathlib import Path

import numpy as np
import pytest

from training.datasets.base import GalleryItem, PersonSearchSplit, Query, SceneAnnotation
from training.evaluation.predictions import PredictionsError
from training.evaluation.search import evaluate_search, size_dependent_iou_threshold

Box = list[float]
PERSON = [0.0, 0.0, 50.0, 100.0]  # a 50 x 100 person: IoU threshold 0.5
ELSEWHERE = [200.0, 0.0, 250.0, 100.0]  # a detection that overlaps nobody


def scene(name: str, people: list[tuple[Box, int]], camera: int = 1) -> SceneAnnotation:
    boxes = np.array([box for box, _ in people], dtype=np.float32).reshape(-1, 4)
    pids = np.array([pid for _, pid in people], dtype=np.int64)
    return SceneAnnotation(name, Path(name), boxes, pids, camera=camera)


def predictions(
    rows: dict[str, list[tuple[Box, float, float | list[float]]]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """{image: [(box, score, embedding)]} -> (detections, embeddings) mappings."""
    detections, embeddings = {}, {}
    for name, image_rows in rows.items():
        detections[name] = np.array([[*box, score] for box, score, _ in image_rows]).reshape(-1, 5)
        vectors = [np.atleast_1d(np.asarray(e, dtype=np.float32)) for _, _, e in image_rows]
        dim = len(vectors[0]) if vectors else 1
        embeddings[name] = np.array(vectors, dtype=np.float32).reshape(-1, dim)
    return detections, embeddings


def prw_split(images: list[SceneAnnotation], queries: list[Query]) -> PersonSearchSplit:
    return PersonSearchSplit("prw", "test", Path("prw"), images, queries)


def search(split: PersonSearchSplit, rows: dict, **options):
    detections, embeddings = predictions(rows)
    query_embeddings = options.pop("query_embeddings", np.ones((len(split.queries), 1)))
    return evaluate_search(split, detections, embeddings, query_embeddings, **options)


def test_iou_threshold_shrinks_for_small_people():
    # min(0.5, w*h / ((w+10)(h+10))): 10x10 -> 100/400; 15x30 -> 450/1000; 20x40 -> 800/1500
    # (0.53, capped at 0.5).
    boxes = np.array([[0, 0, 10, 10], [0, 0, 15, 30], [0, 0, 20, 40], [5, 5, 105, 205]])
    np.testing.assert_allclose(size_dependent_iou_threshold(boxes), [0.25, 0.45, 0.5, 0.5])


def test_a_detection_with_iou_045_finds_a_small_person_but_not_a_large_one():
    # The query person is 10 x 10 in gallery image "g": threshold 0.25, so a detection covering
    # 45% of the box (IoU 0.45) finds them: AP 1, top-1 hit.
    images = [scene("q", [([0, 0, 10, 10], 0)]), scene("g", [([0, 0, 10, 10], 0)])]
    split = prw_split(images, [Query(0, "q", np.array([0, 0, 10, 10.0]), camera=1)])
    result = search(split, {"q": [], "g": [([0, 0, 10, 4.5], 0.9, 0.7)]})
    assert result.mean_average_precision == pytest.approx(1.0)
    assert result.top_k[1] == 1.0
    # A 100 x 200 person needs IoU 0.5: the same 45% coverage finds nothing. AP 0 (the person
    # still counts: count_gt 1, count_tp 0).
    images = [scene("q", [([0, 0, 100, 200], 0)]), scene("g", [([0, 0, 100, 200], 0)])]
    split = prw_split(images, [Query(0, "q", np.array([0, 0, 100, 200.0]), camera=1)])
    result = search(split, {"q": [], "g": [([0, 0, 100, 90], 0.9, 0.7)]})
    assert result.mean_average_precision == 0.0
    assert result.top_k[10] == 0.0


def test_at_most_one_positive_per_image_the_most_similar_overlapping_detection():
    # Image "g" holds the person; two detections overlap them: A (similarity 0.8, IoU 0.6) and
    # B (similarity 0.6, IoU 1). Only A, the most similar, is positive (not the best-overlapping
    # B, which becomes a negative). Image "n" has a negative at 0.9.
    # Ranked: n 0.9 (-), A 0.8 (+), B 0.6 (-): AP = precision at A = 1/2; top-1 miss.
    # (Were B a positive too, AP would be (1/2 + 2/3) / 2.)
    a_box = [0, 0, 50, 60]  # IoU with PERSON: 3000 / 5000 = 0.6
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)]), scene("n", [])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    rows = {
        "q": [],
        "g": [(a_box, 0.9, 0.8), (PERSON, 0.9, 0.6)],
        "n": [(PERSON, 0.9, 0.9)],
    }
    result = search(split, rows)
    assert result.average_precisions[0] == pytest.approx(1 / 2)
    np.testing.assert_array_equal(result.hits[0], [False, True, True])


def test_a_missed_target_scales_ap_by_recall():
    # The person is in "g1" (found, similarity 0.7) and "g2" (no detection at all: the image is
    # skipped, but the person still counts). count_gt 2, count_tp 1: AP = 1 * 1/2.
    images = [scene("q", [(PERSON, 0)]), scene("g1", [(PERSON, 0)]), scene("g2", [(PERSON, 0)])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    result = search(split, {"q": [], "g1": [(PERSON, 0.9, 0.7)], "g2": []})
    assert result.mean_average_precision == pytest.approx(1 / 2)
    assert result.top_k[1] == 1.0


def test_the_query_image_is_not_part_of_its_gallery():
    # The query image "q" holds the query person and a detection on them with similarity 1.0;
    # counting it would make AP 1. Excluded: "n" (0.8, negative) ranks above "g" (0.5, the
    # person): AP 1/2, count_gt 1.
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)]), scene("n", [])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    rows = {"q": [(PERSON, 0.9, 1.0)], "g": [(PERSON, 0.9, 0.5)], "n": [(PERSON, 0.9, 0.8)]}
    result = search(split, rows)
    assert result.mean_average_precision == pytest.approx(1 / 2)
    assert result.top_k[1] == 0.0


def test_cross_camera_keeps_other_cameras_for_counting_and_ranking():
    # Query from camera 1. Person in "a" (camera 1, similarity 0.9) and "b" (camera 2, 0.6);
    # negatives "c" (camera 2, 0.5) and "d" (camera 1, 0.95).
    # All cameras: d (-), a (+), b (+), c (-): AP = (1/2 + 2/3) / 2 = 7/12.
    # Cross-camera: b (+), c (-): AP 1. Were "a" still counted in count_gt, AP would be 1/2.
    images = [
        scene("q", [(PERSON, 0)], camera=1),
        scene("a", [(PERSON, 0)], camera=1),
        scene("b", [(PERSON, 0)], camera=2),
        scene("c", [], camera=2),
        scene("d", [], camera=1),
    ]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    rows = {
        "q": [],
        "a": [(PERSON, 0.9, 0.9)],
        "b": [(PERSON, 0.9, 0.6)],
        "c": [(PERSON, 0.9, 0.5)],
        "d": [(PERSON, 0.9, 0.95)],
    }
    all_cameras = search(split, rows)
    assert all_cameras.mean_average_precision == pytest.approx(7 / 12)
    assert all_cameras.top_k[1] == 0.0
    cross_camera = search(split, rows, cross_camera=True)
    assert cross_camera.mean_average_precision == pytest.approx(1.0)
    assert cross_camera.top_k[1] == 1.0


def test_cross_camera_needs_camera_ids():
    images = [scene("q", [(PERSON, 0)], camera=-1), scene("g", [(PERSON, 0)], camera=-1)]
    split = prw_split(images, [Query(0, "q", np.array(PERSON))])
    with pytest.raises(ValueError, match="camera ids"):
        search(split, {"q": [], "g": []}, cross_camera=True)


def cuhk_split(images: list[SceneAnnotation], galleries: list[tuple[GalleryItem, ...]]):
    queries = [Query(0, "q", np.array(PERSON), gallery=gallery) for gallery in galleries]
    return PersonSearchSplit("cuhk_sysu", "test", Path("cuhk"), images, queries)


CUHK_IMAGES = [scene(name, [(PERSON, -1)], camera=-1) for name in ("q", "g1", "g2", "g3", "g4")]
CUHK_ROWS = {
    "q": [],
    "g1": [(PERSON, 0.9, 0.6)],  # the target
    "g2": [(PERSON, 0.9, 0.5)],
    "g3": [(PERSON, 0.9, 0.9)],
    "g4": [(PERSON, 0.9, 0.7)],
}


def test_explicit_galleries_and_the_full_gallery_protocol():
    # The protocol gallery {g1 (target), g2} ranks g1 0.6 (+), g2 0.5 (-): AP 1. The full
    # gallery appends the rest of the pool as negatives, g3 0.9 and g4 0.7, each once:
    # ranked g3, g4, g1 (+), g2: AP = 1/3. The person is found by the gallery entry's box, not
    # by identity (the annotations here carry no identities at all).
    small = (GalleryItem("g1", np.array(PERSON)), GalleryItem("g2", None))
    full = (*small, GalleryItem("g3", None), GalleryItem("g4", None))
    result = search(cuhk_split(CUHK_IMAGES, [small, full]), CUHK_ROWS)
    np.testing.assert_allclose(result.average_precisions, [1.0, 1 / 3])
    assert result.num_queries == 2


def test_explicit_galleries_must_list_each_image_once_and_never_the_query_image():
    twice = (GalleryItem("g1", np.array(PERSON)), GalleryItem("g2", None), GalleryItem("g2", None))
    with pytest.raises(ValueError, match="twice"):
        search(cuhk_split(CUHK_IMAGES, [twice]), CUHK_ROWS)
    own = (GalleryItem("g1", np.array(PERSON)), GalleryItem("q", None))
    with pytest.raises(ValueError, match="own image"):
        search(cuhk_split(CUHK_IMAGES, [own]), CUHK_ROWS)
    unknown = (GalleryItem("g1", np.array(PERSON)), GalleryItem("elsewhere", None))
    with pytest.raises(ValueError, match="not in cuhk_sysu test"):
        search(cuhk_split(CUHK_IMAGES, [unknown]), CUHK_ROWS)


def test_top_k_ranks_detections_not_images():
    # One negative image with five detections, all more similar than the person in "g": the
    # person is the 6th detection (top-5 miss, top-10 hit) although "g" is the 2nd image.
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)]), scene("crowd", [])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    crowd = [([60.0 * i, 200, 60.0 * i + 50, 300], 0.9, 0.9 + i / 100) for i in range(5)]
    result = search(split, {"q": [], "g": [(PERSON, 0.9, 0.5)], "crowd": crowd})
    np.testing.assert_array_equal(result.hits[0], [False, False, True])
    assert result.mean_average_precision == pytest.approx(1 / 6)


def test_max_iou_mode_takes_the_query_images_detection_overlapping_the_query_box_most():
    # Query box (0, 0, 10, 10) in "q". Detection a (0, 0, 10, 8): IoU 0.8, embedding [1, 0],
    # score 0.6. Detection b (7, 0, 17, 10): IoU 30/170, embedding [0, 1], score 0.99.
    # Max IoU picks a (not the confident b): the person in "g" ([1, 0], similarity 1) ranks
    # before the negative in "n" ([0, 1], similarity 0): AP 1. With b it would be 1/2.
    small_person = [0.0, 0.0, 10.0, 10.0]
    images = [scene("q", [(small_person, 0)]), scene("g", [(PERSON, 0)]), scene("n", [])]
    split = prw_split(images, [Query(0, "q", np.array(small_person), camera=1)])
    rows = {
        "q": [([0, 0, 10, 8], 0.6, [1, 0]), ([7, 0, 17, 10], 0.99, [0, 1])],
        "g": [(PERSON, 0.9, [1, 0])],
        "n": [(PERSON, 0.9, [0, 1])],
    }
    result = search(split, rows, query_embeddings=None)
    assert result.query_mode == "max_iou"
    assert result.mean_average_precision == pytest.approx(1.0)
    np.testing.assert_allclose(result.query_best_ious, [0.8])
    assert result.num_low_iou_queries == 0


def test_max_iou_mode_takes_the_arg_max_even_without_overlap_and_counts_it():
    # Nothing in "q" overlaps the query box: the first detection (IoU 0, a tie) is still used,
    # and the query is reported among those with best IoU < 0.5.
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    rows = {"q": [(ELSEWHERE, 0.9, 0.3), (ELSEWHERE, 0.8, 0.1)], "g": [(PERSON, 0.9, 1.0)]}
    result = search(split, rows, query_embeddings=None)
    assert result.num_low_iou_queries == 1
    assert result.mean_average_precision == pytest.approx(1.0)


def test_max_iou_mode_query_image_without_detections_scores_zero_and_is_counted():
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    result = search(split, {"q": [], "g": [(PERSON, 0.9, 1.0)]}, query_embeddings=None)
    assert result.num_queries == 1
    assert result.mean_average_precision == 0.0
    assert result.num_low_iou_queries == 1


def test_det_thresh_drops_detections_before_search():
    # The detection on the person scores 0.4: searched at det_thresh 0.3 (AP 1), dropped at
    # 0.5 (the person is missed: AP 0, and the query still counts).
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)]), scene("n", [])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    rows = {"q": [], "g": [(PERSON, 0.4, 0.9)], "n": [(PERSON, 0.6, 0.5)]}
    assert search(split, rows, det_thresh=0.3).mean_average_precision == pytest.approx(1.0)
    low = search(split, rows, det_thresh=0.5)
    assert low.mean_average_precision == 0.0
    assert low.num_queries == 1
    assert low.det_thresh == 0.5


def test_every_query_counts_even_without_any_positive():
    # Query 1's person (pid 1) appears nowhere else: AP 0, counted, never skipped.
    images = [scene("q", [(PERSON, 0), (ELSEWHERE, 1)]), scene("g", [(PERSON, 0)])]
    queries = [
        Query(0, "q", np.array(PERSON), camera=1),
        Query(1, "q", np.array(ELSEWHERE), camera=1),
    ]
    result = search(prw_split(images, queries), {"q": [], "g": [(PERSON, 0.9, 1.0)]})
    np.testing.assert_allclose(result.average_precisions, [1.0, 0.0])
    assert result.mean_average_precision == pytest.approx(0.5)
    assert result.num_queries_without_positives == 1


def test_predictions_must_cover_the_split():
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)])]
    split = prw_split(images, [Query(0, "q", np.array(PERSON), camera=1)])
    with pytest.raises(PredictionsError, match="no predictions for 1 of the 2 images"):
        search(split, {"q": []})
    with pytest.raises(PredictionsError, match="2 query embeddings for the 1 queries"):
        search(split, {"q": [], "g": []}, query_embeddings=np.ones((2, 1)))


def test_cbgm_rescues_a_person_recognised_by_their_companion():
    # Query image "q": the query (box PERSON) and a companion at ELSEWHERE (embedding [0, 1]);
    # a detection on the query box itself is suppressed from the context (IoU > 0.5).
    # Gallery "g": the person ([0.6, 0.8], similarity 0.6) and the companion ([0, 1], 0).
    # Gallery "n": a stranger ([0.8, 0.6], similarity 0.8).
    # Without CBGM: n (-), person (+): AP 1/2.
    # With k1 = 2, k2 = 2 both images are re-scored. In "g" the matching pairs query-person
    # (0.6) and companion-companion (1.0), so the person's similarity becomes max(0.6, 1.0) = 1;
    # in "n" the query takes the stranger, whose similarity stays 0.8. Ranked: person, n: AP 1.
    images = [scene("q", [(PERSON, 0)]), scene("g", [(PERSON, 0)]), scene("n", [])]
    queries = [
        Query(
            0,
            "q",
            np.array(PERSON),
            gallery=(GalleryItem("g", np.array(PERSON)), GalleryItem("n", None)),
        )
    ]
    split = PersonSearchSplit("cuhk_sysu", "test", Path("cuhk"), images, queries)
    rows = {
        "q": [(PERSON, 0.95, [1, 0]), (ELSEWHERE, 0.9, [0, 1])],
        "g": [(PERSON, 0.9, [0.6, 0.8]), (ELSEWHERE, 0.9, [0, 1])],
        "n": [(PERSON, 0.9, [0.8, 0.6])],
    }
    query_embeddings = np.array([[1.0, 0.0]])
    plain = search(split, rows, query_embeddings=query_embeddings)
    assert plain.mean_average_precision == pytest.approx(1 / 2)
    rescored = search(
        split, rows, query_embeddings=query_embeddings, cbgm=True, cbgm_k1=2, cbgm_k2=2
    )
    assert rescored.mean_average_precision == pytest.approx(1.0)
    assert rescored.cbgm


# --- a literal transcription of the protocol (docs/evaluation.md), to compare with on random data


def reference_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union


def reference_step_ap(labels: list[int], scores: list[float]) -> float:
    """Walk the precision-recall curve (no ties in random data)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    true_positives, ap = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            true_positives += 1
            ap += (1 / sum(labels)) * true_positives / rank
    return ap


def reference_search(split, detections, embeddings, query_embeddings, det_thresh, cross_camera):
    by_name = split.by_name()
    aps, hits = [], []
    for query, vector in zip(split.queries, query_embeddings, strict=True):
        if query.gallery is None:
            gallery = []
            for image in split.images:
                if image.name != query.image:
                    boxes = image.boxes[image.pids == query.pid]
                    gallery.append((image.name, boxes[0] if len(boxes) else None))
        else:
            gallery = [(item.image, item.target) for item in query.gallery]
        if cross_camera:
            gallery = [(name, t) for name, t in gallery if by_name[name].camera != query.camera]
        labels, scores, count_gt, count_tp = [], [], 0, 0
        for name, target in gallery:
            count_gt += target is not None
            keep = detections[name][:, 4] >= det_thresh
            boxes, sims = detections[name][keep, :4], embeddings[name][keep] @ vector
            image_labels = [0] * len(sims)
            if target is not None:
                w, h = target[2] - target[0], target[3] - target[1]
                threshold = min(0.5, w * h / ((w + 10) * (h + 10)))
                for j in sorted(range(len(sims)), key=lambda j: -sims[j]):
                    if reference_iou(boxes[j], target) >= threshold:
                        image_labels[j] = 1
                        count_tp += 1
                        break
            labels += image_labels
            scores += list(sims)
        aps.append(
            0.0 if count_tp == 0 else reference_step_ap(labels, scores) * count_tp / count_gt
        )
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        hits.append([any(labels[i] for i in ranked[:k]) for k in (1, 5, 10)])
    return np.array(aps), np.array(hits)


def random_split(seed: int, explicit_galleries: bool):
    rng = np.random.default_rng(seed)
    images, detections, embeddings = [], {}, {}
    identities = rng.normal(size=(6, 4))
    for i in range(24):
        count = int(rng.integers(1, 5))
        corners = rng.uniform(0, 300, size=(count, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(8, 120, size=(count, 2))], axis=1)
        pids = rng.integers(-1, 6, size=count)
        image = SceneAnnotation(
            f"img{i}", Path("x"), boxes.astype(np.float32), pids, camera=int(rng.integers(1, 4))
        )
        images.append(image)
        # Detections: most people found, with jitter, plus one false alarm per image.
        found = rng.random(count) < 0.8
        jittered = boxes[found] + rng.normal(0, 5, size=(int(found.sum()), 4))
        jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
        false_alarm = np.concatenate([corners[:1] + 150, corners[:1] + 200], axis=1)
        rows = np.concatenate([jittered, false_alarm])
        scores = rng.uniform(0.2, 1.0, size=(len(rows), 1))
        detections[image.name] = np.concatenate([rows, scores], axis=1)
        detected_pids = np.append(pids[found], -1)
        signal = np.where(detected_pids[:, None] >= 0, identities[detected_pids], 0.0)
        embeddings[image.name] = (signal + rng.normal(size=signal.shape)).astype(np.float32)
    labeled = [(image, j) for image in images for j in np.flatnonzero(image.pids >= 0)]
    queries = []
    for k in rng.choice(len(labeled), size=8, replace=False):
        image, j = labeled[k]
        pid = int(image.pids[j])
        gallery = None
        if explicit_galleries:
            others = [im for im in images if im.name != image.name]
            chosen = rng.choice(len(others), size=10, replace=False)
            gallery = tuple(
                GalleryItem(
                    others[c].name,
                    others[c].boxes[others[c].pids == pid][0]
                    if (others[c].pids == pid).any()
                    else None,
                )
                for c in chosen
            )
        queries.append(Query(pid, image.name, image.boxes[j], camera=image.camera, gallery=gallery))
    split = PersonSearchSplit("prw", "test", Path("x"), images, queries)
    query_embeddings = rng.normal(size=(len(queries), 4)) + identities[[q.pid for q in queries]]
    return split, detections, embeddings, query_embeddings


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("explicit", "cross_camera"), [(False, False), (False, True), (True, False)]
)
def test_matches_a_literal_transcription_of_the_protocol(seed, explicit, cross_camera):
    split, detections, embeddings, query_embeddings = random_split(seed, explicit)
    result = evaluate_search(
        split, detections, embeddings, query_embeddings, det_thresh=0.4, cross_camera=cross_camera
    )
    aps, hits = reference_search(split, detections, embeddings, query_embeddings, 0.4, cross_camera)
    np.testing.assert_allclose(result.average_precisions, aps, atol=1e-12)
    np.testing.assert_array_equal(result.hits, hits)
    assert 0 < aps.mean() < 1  # the random data exercises real rankings
