"""Run a model over a test split and score it with the standard protocol.

``evaluate_model`` is what the trainer (every N epochs and at the end) and
``benchmarks/learn.py`` call: it embeds every image of the test split (gallery and query images)
in batches, maps the boxes back to original pixels with each image's preprocessing scale, builds
the :class:`~training.evaluation.Predictions` of ``training.evaluation`` and returns flat metrics:

- person search datasets: ``mAP``, ``top1``/``top5``/``top10``, detection ``det_ap`` and
  ``det_recall``, and for datasets with cameras (PRW) the same search metrics with the
  ``cross_camera_`` prefix; ``low_iou_queries`` counts max-IoU queries whose best detection
  overlaps the query box less than 0.5;
- CrowdHuman: ``mr2`` (MR^-2, lower is better), ``ap`` and ``recall``.

Query embeddings: ``query_mode: gt_box`` embeds each query box with the model's ``embed_boxes``
(models without it are refused, rather than silently scored another way); ``max_iou`` takes the
detection on the query image that overlaps the query box most. Models whose search similarity
is confidence-weighted (``confidence_weighted_similarity``: SeqNet, PS-ARM) have their detections'
embeddings multiplied by their scores, so that the predictions hold what their search compares.

Under torch.distributed every rank embeds a share of the images; rank 0 gathers them, scores
them and returns the metrics, the other ranks return {}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.preprocess import PreprocessConfig, normalize_and_resize, pad_batch, scale_boxes
from training.config import ConfigError, EvalConfig, TrainConfig
from training.data import load_split, read_rgb
from training.datasets import PersonSearchSplit, Query
from training.evaluation import (
    Predictions,
    QueryMode,
    evaluate_detections,
    evaluate_pedestrian_detection,
    evaluate_search,
    save_predictions,
)

DETECTION_ONLY_DATASETS = ("crowdhuman",)


@dataclass(frozen=True)
class ImageOutput:
    """A model's output for one image, in original pixels: (n, 5) x1 y1 x2 y2 score, (n, D)
    embeddings (D may be 0 for a detector) and the image's (width, height)."""

    detections: np.ndarray
    embeddings: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class InferenceSettings:
    """How to run a model over images: where, how many at once, with how many decoding worker
    processes, under autocast (CUDA float16) or not, with a progress bar or not."""

    device: torch.device
    batch_size: int = 1
    workers: int = 0
    amp: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class PreparedBatch:
    images: Tensor  # (B, 3, H, W), padded
    image_sizes: Tensor  # (B, 2) int64, per image (height, width) in input pixels
    scales: list[tuple[float, float]]  # per image, original -> input pixels
    sizes: list[tuple[int, int]]  # per image, original (width, height)


class PreparedImages(Dataset):
    """Images decoded, resized and normalised the way the model was configured to see them.

    Item i is ``(image (3, h, w), scale (sx, sy) original -> input pixels, (width, height))``.
    """

    def __init__(self, paths: Sequence[Path], preprocess: PreprocessConfig) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[float, float], tuple[int, int]]:
        pixels = read_rgb(self.paths[index])
        tensor, scale = normalize_and_resize(pixels, self.preprocess)
        return tensor, scale, (pixels.shape[1], pixels.shape[0])


class BatchCollate:
    """Pads a list of PreparedImages items into a PreparedBatch."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, items: Sequence[tuple[Tensor, tuple[float, float], tuple[int, int]]]):
        images, scales, sizes = zip(*items, strict=True)
        padded, image_sizes = pad_batch(list(images), self.size_divisor)
        return PreparedBatch(padded, image_sizes, list(scales), list(sizes))


def prepared_batches(
    paths: Sequence[Path], preprocess: PreprocessConfig, settings: InferenceSettings
) -> DataLoader:
    """PreparedBatches of the images in order, decoded by `settings.workers` processes."""
    return DataLoader(
        PreparedImages(paths, preprocess),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=BatchCollate(preprocess.size_divisor),
        pin_memory=settings.device.type == "cuda",
    )


def detections_to_original(
    boxes: Tensor,
    scores: Tensor,
    embeddings: Tensor,
    scale: tuple[float, float],
    size: tuple[int, int],
    min_score: float,
) -> ImageOutput:
    """One image's fixed-size outputs (K slots) as detections in original pixels.

    Keeps the slots scored > 0 (unused slots score 0 by the model contract) and >= min_score,
    maps boxes back to original pixels and clips them to the image.
    """
    keep = (scores > 0) & (scores >= min_score)
    width, height = size
    original = scale_boxes(boxes[keep].float(), (1 / scale[0], 1 / scale[1]))
    limits = original.new_tensor([width, height, width, height])
    original = torch.minimum(original.clamp(min=0), limits)
    detections = torch.cat([original, scores[keep, None].float()], dim=1)
    return ImageOutput(detections.cpu().numpy(), embeddings[keep].float().cpu().numpy(), size)


@torch.no_grad()
def detect_images(
    model: nn.Module,
    paths: dict[str, Path],
    min_scores: dict[str, float],
    settings: InferenceSettings,
) -> dict[str, ImageOutput]:
    """Run the model (in eval mode) over images; boxes come back in original pixels.

    Detections scored below ``min_scores[name]`` are dropped (the evaluator would drop them
    anyway; keeping them would only cost memory). A model with
    ``confidence_weighted_similarity`` (SeqNet, PS-ARM) gets its embeddings multiplied by their
    detection scores, so that a similarity is the cosine times the score, as its search defines.
    """
    weighted = bool(getattr(model, "confidence_weighted_similarity", False))
    names = list(paths)
    outputs: dict[str, ImageOutput] = {}
    batches = prepared_batches([paths[n] for n in names], model.preprocess, settings)
    progress = tqdm(total=len(names), desc="detect", disable=not settings.show_progress)
    for batch in batches:
        images = batch.images.to(settings.device, non_blocking=True)
        image_sizes = batch.image_sizes.to(settings.device, non_blocking=True)
        with torch.autocast(settings.device.type, dtype=torch.float16, enabled=settings.amp):
            result = model(images, image_sizes=image_sizes)
        embeddings = result.embeddings
        if weighted:
            embeddings = embeddings * result.scores[..., None].to(embeddings.dtype)
        for i, (scale, size) in enumerate(zip(batch.scales, batch.sizes, strict=True)):
            name = names[len(outputs)]  # batches come in order
            outputs[name] = detections_to_original(
                result.boxes[i],
                result.scores[i],
                embeddings[i],
                scale,
                size,
                min_scores[name],
            )
        progress.update(len(batch.sizes))
    progress.close()
    return outputs


def require_box_embedding(model: nn.Module) -> None:
    """A ConfigError unless the model can embed a given box (``query_mode: gt_box``)."""
    if not hasattr(model, "embed_boxes"):
        raise ConfigError(
            f"eval.query_mode: gt_box needs a model with embed_boxes, which "
            f"{type(model).__name__} does not have; use max_iou"
        )


@torch.no_grad()
def embed_query_boxes(
    model: nn.Module,
    queries: Sequence[Query],
    paths: dict[str, Path],
    settings: InferenceSettings,
) -> np.ndarray:
    """(Q, D) L2-normalised embeddings of the query boxes ("GT-box" mode), in query order
    ((0, 0) for no queries)."""
    require_box_embedding(model)
    vectors: list[np.ndarray] = []
    batches = prepared_batches([paths[q.image] for q in queries], model.preprocess, settings)
    progress = tqdm(total=len(queries), desc="queries", disable=not settings.show_progress)
    done = 0
    for batch in batches:  # in query order
        chunk = queries[done : done + len(batch.scales)]
        done += len(chunk)
        boxes = [
            torch.as_tensor(scale_boxes(q.box.astype(np.float32)[None], scale))
            for q, scale in zip(chunk, batch.scales, strict=True)
        ]
        images = batch.images.to(settings.device, non_blocking=True)
        image_sizes = batch.image_sizes.to(settings.device, non_blocking=True)
        with torch.autocast(settings.device.type, dtype=torch.float16, enabled=settings.amp):
            embeddings = model.embed_boxes(
                images, [b.to(settings.device) for b in boxes], image_sizes=image_sizes
            )
        vectors.append(F.normalize(embeddings.float(), dim=1).cpu().numpy())
        progress.update(len(chunk))
    progress.close()
    return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def image_paths(split: PersonSearchSplit) -> dict[str, Path]:
    """Every image to run: the split's images (query images are among them)."""
    paths = {annotation.name: annotation.path for annotation in split.images}
    missing = sorted({q.image for q in split.queries} - set(paths))
    if missing:
        raise ValueError(
            f"{split.dataset} {split.split}: query images {missing[:3]} are not images of the split"
        )
    return paths


def predict_split(
    model: nn.Module,
    split: PersonSearchSplit,
    det_thresh: float,
    query_mode: QueryMode,
    settings: InferenceSettings,
) -> Predictions | None:
    """The model's Predictions on a split (rank 0; None on other ranks under torch.distributed).

    Search datasets keep gallery detections from ``det_thresh`` up and every used slot of the
    query images; detection-only datasets (CrowdHuman) keep every used slot.
    """
    rank, world_size = _rank_and_world_size()
    paths = image_paths(split)
    detect_only = split.dataset in DETECTION_ONLY_DATASETS
    # The miss-rate curve runs over every detection; search looks from det_thresh up, except on
    # query images, where max-IoU mode takes the best-overlapping detection whatever its score.
    low_floor = {q.image for q in split.queries} if not detect_only else set(paths)
    min_scores = {name: 0.0 if name in low_floor else det_thresh for name in paths}
    shard = {name: path for i, (name, path) in enumerate(paths.items()) if i % world_size == rank}
    outputs = detect_images(model, shard, min_scores, settings)
    query_vectors = None
    if query_mode == "gt_box" and split.queries:
        queries = split.queries[rank::world_size]
        query_vectors = embed_query_boxes(model, queries, paths, settings)
    outputs, query_vectors = _gather_on_rank_zero(outputs, query_vectors, rank, world_size)
    if rank != 0:
        return None
    return Predictions(
        detections={name: outputs[name].detections for name in paths},
        embeddings=None if detect_only else {name: outputs[name].embeddings for name in paths},
        query_embeddings=query_vectors,
        query_images=tuple(q.image for q in split.queries) if query_vectors is not None else None,
        image_sizes={name: outputs[name].size for name in paths},
    )


def score_predictions(
    split: PersonSearchSplit, predictions: Predictions, eval_config: EvalConfig
) -> dict[str, float]:
    """Flat metrics of predictions on a split (see the module docstring for the names)."""
    if split.dataset in DETECTION_ONLY_DATASETS:
        result = evaluate_pedestrian_detection(
            split.images, predictions.detections, image_sizes=predictions.image_sizes
        )
        return {
            "mr2": result.log_average_miss_rate,
            "ap": result.average_precision,
            "recall": result.recall,
        }
    detection = evaluate_detections(split.images, predictions.detections, eval_config.det_thresh)
    metrics = {"det_ap": detection.average_precision, "det_recall": detection.recall}
    has_cameras = all(item.camera >= 0 for item in [*split.images, *split.queries])
    for cross_camera in (False, True) if has_cameras else (False,):
        search = evaluate_search(
            split,
            predictions.detections,
            predictions.embeddings,
            predictions.query_embeddings,
            det_thresh=eval_config.det_thresh,
            cross_camera=cross_camera,
            cbgm=eval_config.cbgm,
        )
        prefix = "cross_camera_" if cross_camera else ""
        metrics[f"{prefix}mAP"] = search.mean_average_precision
        for k, value in search.top_k.items():
            metrics[f"{prefix}top{k}"] = value
        if not cross_camera:
            metrics["num_queries"] = float(search.num_queries)
            if search.query_mode == "max_iou":
                metrics["low_iou_queries"] = float(search.num_low_iou_queries)
    return metrics


def load_test_split(config: TrainConfig) -> PersonSearchSplit:
    """The configured test split (CUHK-SYSU with the configured gallery size)."""
    options = (
        {"gallery_size": config.eval.gallery_size} if config.data.dataset == "cuhk_sysu" else {}
    )
    return load_split(config.data, config.data.test_split, **options)


def evaluate_model(
    model: nn.Module,
    config: TrainConfig,
    device: torch.device,
    split: PersonSearchSplit | None = None,
    predictions_path: Path | None = None,
) -> dict[str, float]:
    """Evaluate a model on the configured test split (or `split`); returns flat metrics on rank
    0 ({} on other ranks). The model is put in eval mode and back in its former mode after.

    `predictions_path` also saves the predictions (thresholded at det_thresh, except query
    images) for ``python -m training.evaluate``.
    """
    split = split if split is not None else load_test_split(config)
    settings = InferenceSettings(
        device=device,
        batch_size=config.eval.batch_size,
        workers=config.data.workers,
        amp=config.amp and device.type == "cuda",
        show_progress=_rank_and_world_size()[0] == 0,
    )
    was_training = model.training
    model.eval()
    try:
        predictions = predict_split(
            model, split, config.eval.det_thresh, config.eval.query_mode, settings
        )
    finally:
        model.train(was_training)
    if predictions is None:
        return {}
    if predictions_path is not None:
        save_predictions(predictions_path, predictions)
    return score_predictions(split, predictions, config.eval)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_on_rank_zero(
    outputs: dict[str, ImageOutput], query_vectors: np.ndarray | None, rank: int, world_size: int
) -> tuple[dict[str, ImageOutput], np.ndarray | None]:
    """Merge every rank's share on rank 0 (queries were split round-robin, so re-interleave)."""
    if world_size == 1:
        return outputs, query_vectors
    shares: list[tuple[dict[str, ImageOutput], np.ndarray | None]] | None = (
        [None] * world_size if rank == 0 else None  # type: ignore[list-item]
    )
    dist.gather_object((outputs, query_vectors), shares, dst=0)
    if rank != 0:
        return {}, None
    merged = {name: out for share_outputs, _ in shares for name, out in share_outputs.items()}
    if query_vectors is None:
        return merged, None
    parts = [vectors for _, vectors in shares]
    dim = max(part.shape[1] for part in parts)  # a rank without queries has a (0, 0) share
    interleaved = np.zeros((sum(len(p) for p in parts), dim), dtype=np.float32)
    for r, part in enumerate(parts):
        interleaved[r::world_size] = part
    return merged, interleaved
