"""The person search metric of the literature: mAP and top-k, exactly as the papers compute it.

For one query (``docs/evaluation.md``, "The search metric"):

1. For every image of the query's gallery: if the query person is in it, ``count_gt += 1``
   before looking at the detections (a target the detector missed still costs recall). Each
   detection scored >= ``det_thresh`` gets the similarity (dot product) of its embedding with
   the query's. In an image holding the target (GT box w x h), the most similar detection whose
   IoU with the target reaches ``min(0.5, w*h / ((w+10)*(h+10)))`` is the one positive; every
   other detection is a negative (at most one positive per image).
2. ``AP = average_precision(labels, similarities) * count_tp / count_gt`` (0 if nothing was
   found), over all labelled detections of all gallery images together.
3. top-k: a hit if a positive is among the k most similar detections (detections, not images).

mAP and top-k are means over all queries; no query is ever skipped. A query whose gallery holds
no image of the person (possible with the cross-camera filter on odd data) scores 0 and is
counted in ``num_queries_without_positives``.

Galleries: CUHK-SYSU queries carry their protocol gallery explicitly (``Query.gallery``, the full
gallery included); a query without one (PRW) searches every image of the split except its own,
with positives found by person id. ``cross_camera`` keeps only images from other cameras than the
query's, both for counting positives and for ranking.

Ties are broken in gallery order (the split's image order, then the detection order of an image),
as a stable sort would; the public scripts leave them to an unstable sort.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.boxes import max_iou_pick, paired_iou
from training.datasets.base import GalleryItem, PersonSearchSplit, Query

from .average_precision import average_precision
from .cbgm import cbgm_parameters, images_to_rescore, match_context, query_context
from .predictions import Predictions, QueryMode

TOP_K = (1, 5, 10)

LOW_IOU = 0.5
"""In max-IoU query mode, queries whose best detection overlaps the query box less than this
are counted (their embedding describes something else, or only part of the person)."""

# Queries are processed in chunks; a chunk whose galleries cover a large share of all detections
# (PRW, the full CUHK-SYSU gallery) gets its similarities from one matrix product, which is far
# faster than gathering the rows query by query. Small galleries (CUHK-SYSU's 100 images) gather.
_QUERY_CHUNK = 32
_GATHER_SHARE = 1 / 32


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Search accuracy on one split under one protocol setting.

    ``average_precisions`` ``(Q,)`` and ``hits`` ``(Q, len(TOP_K))`` are per query, in the
    split's query order; ``query_best_ious`` ``(Q,)`` is given in max-IoU query mode (0 for a
    query image without detections).
    """

    mean_average_precision: float
    top_k: dict[int, float]
    num_queries: int
    average_precisions: np.ndarray
    hits: np.ndarray
    det_thresh: float
    cross_camera: bool
    cbgm: bool
    query_mode: QueryMode
    query_best_ious: np.ndarray | None
    num_queries_without_positives: int

    @property
    def num_low_iou_queries(self) -> int:
        """Max-IoU mode: queries whose best detection has IoU < 0.5 with the query box."""
        if self.query_best_ious is None:
            return 0
        return int(np.count_nonzero(self.query_best_ious < LOW_IOU))


def size_dependent_iou_threshold(boxes: np.ndarray) -> np.ndarray:
    """``min(0.5, w*h / ((w+10)*(h+10)))`` for GT boxes ``(..., 4)`` x1 y1 x2 y2 -> ``(...)``.

    Small people are hard to box precisely, so a detection needs less overlap to find them.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return np.minimum(0.5, width * height / ((width + 10) * (height + 10)))


def evaluate_search(
    split: PersonSearchSplit,
    gallery_detections: Mapping[str, np.ndarray],
    gallery_embeddings: Mapping[str, np.ndarray],
    query_embeddings: np.ndarray | None = None,
    *,
    det_thresh: float = 0.5,
    cross_camera: bool = False,
    cbgm: bool = False,
    cbgm_k1: int | None = None,
    cbgm_k2: int | None = None,
) -> SearchResult:
    """Score person search on ``split`` (its images and queries) with the standard protocol.

    ``gallery_detections[name]`` is ``(n, 5)`` x1 y1 x2 y2 score and ``gallery_embeddings[name]``
    ``(n, D)`` for every image of the split (query images included); ``query_embeddings`` is
    ``(Q, D)`` in the split's query order ("GT-box" mode), or None to take each query's embedding
    from its image's detections ("max-IoU detection" mode: the detection with the largest IoU to
    the query box, whatever its score, even if nothing overlaps). ``cbgm`` turns on context
    bipartite graph matching with (k1, k2) from the dataset unless given.
    """
    predictions = Predictions(gallery_detections, gallery_embeddings, query_embeddings)
    predictions.check_split(split, search=True)
    if not split.queries:
        raise ValueError(f"{split.dataset} {split.split} has no queries to search for")
    if cross_camera:
        _require_cameras(split)
    k1, k2 = cbgm_parameters(split.dataset, cbgm_k1, cbgm_k2) if cbgm else (0, 0)

    gallery = _Gallery.build(split, gallery_detections, gallery_embeddings, det_thresh)
    protocol = _Protocol(split, gallery, cross_camera)
    queries = _QueryVectors.build(
        split.queries, gallery_detections, gallery_embeddings, query_embeddings
    )

    num_queries = len(split.queries)
    aps = np.zeros(num_queries)
    hits = np.zeros((num_queries, len(TOP_K)), dtype=bool)
    without_positives = 0
    for start in range(0, num_queries, _QUERY_CHUNK):
        chunk = range(start, min(start + _QUERY_CHUNK, num_queries))
        galleries = [protocol.gallery_of(split.queries[q]) for q in chunk]
        ranked = [g.detections for g in galleries]
        similarities = _similarities(
            gallery.embeddings, queries.vectors[chunk.start : chunk.stop], ranked
        )
        for q, query_gallery, sims in zip(chunk, galleries, similarities, strict=True):
            if len(query_gallery.targets) == 0:
                without_positives += 1
                continue
            if not queries.valid[q]:
                continue  # max-IoU mode and no detection in the query image: nothing to search
            if cbgm:
                context = queries.context(
                    q, split.queries[q], gallery_detections, gallery_embeddings, det_thresh, k2
                )
                _rescore_with_context(sims, query_gallery, gallery, context, k1)
            labels = _label_detections(sims, query_gallery, gallery)
            aps[q], hits[q] = _score_query(labels, sims, len(query_gallery.targets))

    return SearchResult(
        mean_average_precision=float(aps.mean()),
        top_k={k: float(hits[:, i].mean()) for i, k in enumerate(TOP_K)},
        num_queries=num_queries,
        average_precisions=aps,
        hits=hits,
        det_thresh=det_thresh,
        cross_camera=cross_camera,
        cbgm=cbgm,
        query_mode=predictions.query_mode,
        query_best_ious=queries.best_ious,
        num_queries_without_positives=without_positives,
    )


@dataclass(frozen=True, eq=False)
class _Gallery:
    """The detections scored >= det_thresh of every image of the split, concatenated once.

    Image i owns rows ``offsets[i]:offsets[i+1]`` of ``boxes`` ``(M, 4)`` and ``embeddings``
    ``(M, D)``; ``image_of`` ``(M,)`` maps each row back to its image.
    """

    index: dict[str, int]
    cameras: np.ndarray
    offsets: np.ndarray
    image_of: np.ndarray
    boxes: np.ndarray
    embeddings: np.ndarray

    @classmethod
    def build(
        cls,
        split: PersonSearchSplit,
        detections: Mapping[str, np.ndarray],
        embeddings: Mapping[str, np.ndarray],
        det_thresh: float,
    ) -> _Gallery:
        names = [annotation.name for annotation in split.images]
        index = {name: i for i, name in enumerate(names)}
        if len(index) != len(names):
            raise ValueError(f"{split.dataset} {split.split} lists some image twice")
        kept = [detections[name][:, 4] >= det_thresh for name in names]
        counts = [int(keep.sum()) for keep in kept]
        dim = next(iter(embeddings.values())).shape[1]
        boxes = [detections[name][keep, :4] for name, keep in zip(names, kept, strict=True)]
        vectors = [embeddings[name][keep] for name, keep in zip(names, kept, strict=True)]
        return cls(
            index=index,
            cameras=np.array([annotation.camera for annotation in split.images]),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            image_of=np.repeat(np.arange(len(names)), counts),
            boxes=np.concatenate([np.zeros((0, 4)), *boxes]).astype(np.float64),
            embeddings=np.concatenate([np.zeros((0, dim), np.float32), *vectors]),
        )


@dataclass(frozen=True, eq=False)
class _Targets:
    """Where a person is: image indices ``(P,)`` and the person's box in each ``(P, 4)``."""

    images: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def where(self, keep: np.ndarray) -> _Targets:
        return _Targets(self.images[keep], self.boxes[keep])


_NO_TARGETS = _Targets(np.zeros(0, dtype=np.int64), np.zeros((0, 4)))


@dataclass(frozen=True, eq=False)
class _QueryGallery:
    """One query's gallery: the rows of its detections in the _Gallery (ascending), which is the
    ranking order, and the gallery images holding the query person (count_gt = their number)."""

    detections: np.ndarray
    targets: _Targets


class _Protocol:
    """Builds each query's gallery: explicit (CUHK-SYSU) or every other image (PRW)."""

    def __init__(self, split: PersonSearchSplit, gallery: _Gallery, cross_camera: bool) -> None:
        self._split = split
        self._gallery = gallery
        self._cross_camera = cross_camera
        self._occurrences = _occurrences(split)

    def gallery_of(self, query: Query) -> _QueryGallery:
        if query.gallery is None:
            images, targets = self._every_other_image(query)
        else:
            images, targets = self._explicit_gallery(query, query.gallery)
        if self._cross_camera:
            images &= self._gallery.cameras != query.camera
            targets = targets.where(images[targets.images])
        detections = np.flatnonzero(images[self._gallery.image_of])
        return _QueryGallery(detections, targets)

    def _every_other_image(self, query: Query) -> tuple[np.ndarray, _Targets]:
        images = np.ones(len(self._gallery.index), dtype=bool)
        own = self._gallery.index.get(query.image)
        if own is not None:
            images[own] = False
        targets = self._occurrences.get(query.pid, _NO_TARGETS)
        return images, targets.where(images[targets.images])

    def _explicit_gallery(
        self, query: Query, items: tuple[GalleryItem, ...]
    ) -> tuple[np.ndarray, _Targets]:
        index = self._gallery.index
        where = f"the gallery of the query in {query.image!r}"
        ids = np.array([index.get(item.image, -1) for item in items], dtype=np.int64)
        if np.any(ids < 0):
            unknown = [item.image for item in items if item.image not in index]
            raise ValueError(
                f"{where} lists {len(unknown)} images that are not in {self._split.dataset} "
                f"{self._split.split}, e.g. {unknown[:3]}"
            )
        images = np.zeros(len(index), dtype=bool)
        images[ids] = True
        if np.count_nonzero(images) != len(ids):
            raise ValueError(f"{where} lists an image twice: each gallery image must count once")
        own = index.get(query.image)
        if own is not None and images[own]:
            raise ValueError(f"{where} contains the query's own image")
        holding = [k for k, item in enumerate(items) if item.target is not None]
        boxes = [np.asarray(items[k].target, dtype=np.float64) for k in holding]
        return images, _Targets(ids[holding], np.array(boxes).reshape(-1, 4))


def _occurrences(split: PersonSearchSplit) -> dict[int, _Targets]:
    """Where each labeled person appears: every image holding them and their box there (the
    first one, should an image hold two boxes of one person, as the public scripts do)."""
    images: dict[int, list[int]] = {}
    boxes: dict[int, list[np.ndarray]] = {}
    for image, annotation in enumerate(split.images):
        pids, first = np.unique(annotation.pids, return_index=True)
        for pid, box in zip(pids.tolist(), annotation.boxes[first], strict=True):
            if pid >= 0:
                images.setdefault(pid, []).append(image)
                boxes.setdefault(pid, []).append(box)
    return {
        pid: _Targets(np.array(images[pid]), np.array(boxes[pid], dtype=np.float64))
        for pid in images
    }


@dataclass(frozen=True, eq=False)
class _QueryVectors:
    """One embedding per query. ``valid[q]`` is False when max-IoU mode found no detection in the
    query image; ``chosen[q]`` is the index of the detection used (max-IoU mode, else -1)."""

    vectors: np.ndarray
    valid: np.ndarray
    chosen: np.ndarray
    best_ious: np.ndarray | None

    @classmethod
    def build(
        cls,
        queries: list[Query],
        detections: Mapping[str, np.ndarray],
        embeddings: Mapping[str, np.ndarray],
        query_embeddings: np.ndarray | None,
    ) -> _QueryVectors:
        num_queries = len(queries)
        if query_embeddings is not None:
            everything = np.ones(num_queries, dtype=bool)
            return cls(query_embeddings, everything, np.full(num_queries, -1), None)
        example = next(iter(embeddings.values()))
        vectors = np.zeros((num_queries, example.shape[1]), dtype=example.dtype)
        chosen = np.full(num_queries, -1)
        best_ious = np.zeros(num_queries)
        for q, query in enumerate(queries):
            boxes = detections[query.image]
            if len(boxes) == 0:
                continue
            chosen[q], best_ious[q] = max_iou_pick(boxes[:, :4], query.box)
            vectors[q] = embeddings[query.image][chosen[q]]
        return cls(vectors, chosen >= 0, chosen, best_ious)

    def context(
        self,
        q: int,
        query: Query,
        detections: Mapping[str, np.ndarray],
        embeddings: Mapping[str, np.ndarray],
        det_thresh: float,
        k2: int,
    ) -> np.ndarray:
        if query.image not in detections:
            raise ValueError(
                f"CBGM needs the detections of the query image {query.image!r}, which has no "
                f"predictions"
            )
        exclude = int(self.chosen[q]) if self.chosen[q] >= 0 else None
        return query_context(
            self.vectors[q],
            query.box,
            detections[query.image],
            embeddings[query.image],
            det_thresh,
            k2,
            exclude=exclude,
        )


def _require_cameras(split: PersonSearchSplit) -> None:
    if any(a.camera < 0 for a in split.images) or any(q.camera < 0 for q in split.queries):
        raise ValueError(
            f"the cross-camera protocol needs camera ids; {split.dataset} {split.split} has "
            f"images or queries without one"
        )


def _similarities(
    embeddings: np.ndarray, query_vectors: np.ndarray, ranked: list[np.ndarray]
) -> list[np.ndarray]:
    """Similarities of each query (row of ``query_vectors``) with its ranked detections."""
    requested = sum(len(rows) for rows in ranked)
    if requested > _GATHER_SHARE * len(embeddings) * len(ranked):
        table = query_vectors.astype(embeddings.dtype) @ embeddings.T  # (chunk, M)
        return [table[j, rows] for j, rows in enumerate(ranked)]
    return [
        embeddings[rows] @ vector.astype(embeddings.dtype)
        for rows, vector in zip(ranked, query_vectors, strict=True)
    ]


def _positions(query_gallery: _QueryGallery, gallery: _Gallery, image: int) -> slice:
    """Where image ``image``'s detections sit in the query's ranking arrays."""
    first = int(np.searchsorted(query_gallery.detections, gallery.offsets[image]))
    return slice(first, first + int(gallery.offsets[image + 1] - gallery.offsets[image]))


def _label_detections(
    similarities: np.ndarray, query_gallery: _QueryGallery, gallery: _Gallery
) -> np.ndarray:
    """``(K,)`` bool: in each image with the query person, its most similar detection that
    overlaps the person's box enough; nothing else. Vectorised over all target images."""
    targets = query_gallery.targets
    starts = gallery.offsets[targets.images]
    counts = gallery.offsets[targets.images + 1] - starts
    rows = _concatenated_ranges(starts, counts)  # detections of the target images
    target_of_row = np.repeat(np.arange(len(targets)), counts)
    target_boxes = targets.boxes[target_of_row]
    overlaps = paired_iou(gallery.boxes[rows], target_boxes)
    found = overlaps >= size_dependent_iou_threshold(target_boxes)
    positions = np.searchsorted(query_gallery.detections, rows[found])
    owners = target_of_row[found]
    # Sort the candidates by target, then by descending similarity (stable, so the first of
    # equally similar detections wins); the first candidate of each target is its positive.
    order = np.lexsort((-similarities[positions], owners))
    sorted_owners = owners[order]
    first_of_target = np.ones(len(order), dtype=bool)
    first_of_target[1:] = sorted_owners[1:] != sorted_owners[:-1]
    labels = np.zeros(len(similarities), dtype=bool)
    labels[positions[order[first_of_target]]] = True
    return labels


def _concatenated_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, without the loop."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if ends.size else 0) + np.repeat(starts - (ends - counts), counts)


def _score_query(
    labels: np.ndarray, similarities: np.ndarray, count_gt: int
) -> tuple[float, np.ndarray]:
    """(AP scaled by the recall count_tp / count_gt, hits at TOP_K) of one query."""
    count_tp = int(labels.sum())
    if count_tp == 0:
        return 0.0, np.zeros(len(TOP_K), dtype=bool)
    ap = average_precision(labels, similarities) * count_tp / count_gt
    rank = _rank_of_first_positive(labels, similarities)
    return ap, np.array([rank < k for k in TOP_K])


def _rank_of_first_positive(labels: np.ndarray, similarities: np.ndarray) -> int:
    """0-based rank of the best positive when sorting by descending similarity, stably."""
    positives = np.flatnonzero(labels)
    best = positives[np.argmax(similarities[positives])]
    score = similarities[best]
    return int(
        np.count_nonzero(similarities > score) + np.count_nonzero(similarities[:best] == score)
    )


def _rescore_with_context(
    similarities: np.ndarray,
    query_gallery: _QueryGallery,
    gallery: _Gallery,
    context: np.ndarray,
    k1: int,
) -> None:
    """CBGM, in place: new similarities for the query's match in the top-k1 detections' images."""
    image_ids = gallery.image_of[query_gallery.detections]
    for image in images_to_rescore(similarities, image_ids, k1).tolist():
        rows = slice(gallery.offsets[image], gallery.offsets[image + 1])
        match = match_context(context, gallery.embeddings[rows])
        if match is not None:
            detection, similarity = match
            similarities[_positions(query_gallery, gallery, image).start + detection] = similarity
