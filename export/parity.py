"""Parity of an exported graph with the PyTorch model it came from.

Both run on the same preprocessed batches (padded images and each image's size in them,
``models.preprocess.PaddedBatch``); their fixed-size outputs are compared detection by detection:

- the number of valid detections (score > 0) of every image must agree;
- both must be sorted by descending score;
- detections are matched by slot index. Two detections whose scores differ by less than twice
  the score tolerance may legitimately swap slots between backends (each side may be off by the
  tolerance), so consecutive slots whose reference scores are that close form a *near-tie group*,
  and inside a group each reference detection is matched with the candidate detection whose box
  is closest (greedily, closest pair first). Outside such groups the match is by index;
- matched detections must have boxes within ``box`` x the longer side of the input, scores
  within ``score`` and embeddings with cosine similarity >= ``cosine``.

For models with an embedding graph (``embed_boxes``), the embeddings of given boxes are compared
too (cosine only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from models.preprocess import PaddedBatch, PreprocessConfig, normalize_and_resize, pad_batch

# Outputs of one batch: boxes (B, K, 4), scores (B, K), embeddings (B, K, D), as numpy.
BatchOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]
# (images (B, 3, H, W), image_sizes (B, 2)) -> outputs.
DetectFn = Callable[[Tensor, Tensor], BatchOutputs]
# (image (1, 3, H, W), boxes (R, 4), image_sizes (1, 2)) -> embeddings (R, D).
EmbedFn = Callable[[Tensor, Tensor, Tensor], np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    """How close two backends must be. ``box`` is relative to the input's longer side."""

    box: float = 1e-3
    score: float = 1e-4
    cosine: float = 0.9999


@dataclass
class ParityReport:
    """The worst differences seen over all compared detections, and every failure."""

    tolerances: Tolerances
    batches: int = 0
    images: int = 0
    compared: int = 0
    near_tied: int = 0
    max_box_error: float = 0.0
    max_score_error: float = 0.0
    min_cosine: float = 1.0
    embeddings: int = 0  # detection embeddings compared (none for a pure detector)
    query_embeddings: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """A few lines for people: verdict, worst differences against their tolerances."""
        tol = self.tolerances
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"parity {verdict}: {self.compared} detections of {self.images} images in "
            f"{self.batches} batches ({self.near_tied} in near-tie groups)"
            + (f", {self.query_embeddings} query embeddings" if self.query_embeddings else ""),
            f"  boxes   max |diff| / image size {self.max_box_error:.2e} (tolerance {tol.box:g})",
            f"  scores  max |diff| {self.max_score_error:.2e} (tolerance {tol.score:g})",
            (
                f"  embeddings min cosine {self.min_cosine:.6f} (tolerance {tol.cosine:g})"
                if self.embeddings or self.query_embeddings
                else "  embeddings: none (a detector)"
            ),
        ]
        lines.extend(f"  - {failure}" for failure in self.failures[:10])
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more")
        return "\n".join(lines)


def _near_tie_groups(scores: np.ndarray, gap: float) -> list[range]:
    """Runs of consecutive slots whose neighbouring scores differ by at most ``gap``."""
    groups, start = [], 0
    for slot in range(1, len(scores) + 1):
        if slot == len(scores) or scores[slot - 1] - scores[slot] > gap:
            groups.append(range(start, slot))
            start = slot
    return groups


def _match_group(reference_boxes: np.ndarray, candidate_boxes: np.ndarray) -> list[int]:
    """For each reference box of a group, the index of its candidate: closest pairs first."""
    distance = np.abs(reference_boxes[:, None, :] - candidate_boxes[None, :, :]).max(-1)
    match = [-1] * len(reference_boxes)
    for flat in np.argsort(distance, axis=None, kind="stable"):
        row, col = divmod(int(flat), distance.shape[1])
        if match[row] < 0 and col not in match:
            match[row] = col
    return match


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-12)


def _compare_image(
    report: ParityReport,
    where: str,
    reference: BatchOutputs,
    candidate: BatchOutputs,
    image_size: int,
) -> None:
    """Compare the detections of one image (arrays without the batch dimension)."""
    tol = report.tolerances
    ref_boxes, ref_scores, ref_embeddings = reference
    cand_boxes, cand_scores, cand_embeddings = candidate
    ref_valid, cand_valid = int((ref_scores > 0).sum()), int((cand_scores > 0).sum())
    if ref_valid != cand_valid:
        report.failures.append(
            f"{where}: {ref_valid} valid detections in PyTorch, {cand_valid} in the export"
        )
        return
    for name, scores in (("PyTorch", ref_scores), ("export", cand_scores)):
        if np.any(np.diff(scores) > 0):
            report.failures.append(f"{where}: {name} scores are not sorted in descending order")
            return
    ref_scores, cand_scores = ref_scores[:ref_valid], cand_scores[:ref_valid]
    order = np.arange(ref_valid)
    for group in _near_tie_groups(ref_scores, 2 * tol.score):
        if len(group) > 1:
            slots = np.asarray(group)
            order[slots] = slots[_match_group(ref_boxes[slots], cand_boxes[slots])]
            report.near_tied += len(group)
    box_error = np.abs(ref_boxes[:ref_valid] - cand_boxes[order]).max(-1, initial=0) / image_size
    score_error = np.abs(ref_scores - cand_scores[order])
    report.compared += ref_valid
    report.max_box_error = max(report.max_box_error, float(box_error.max(initial=0)))
    report.max_score_error = max(report.max_score_error, float(score_error.max(initial=0)))
    if (box_error > tol.box).any():
        report.failures.append(f"{where}: boxes differ by up to {box_error.max():.2e} x size")
    if (score_error > tol.score).any():
        report.failures.append(f"{where}: scores differ by up to {score_error.max():.2e}")
    if ref_embeddings.shape[-1] and ref_valid:
        cosine = _cosine(ref_embeddings[:ref_valid], cand_embeddings[order])
        report.embeddings += ref_valid
        report.min_cosine = min(report.min_cosine, float(cosine.min()))
        if (cosine < tol.cosine).any():
            report.failures.append(f"{where}: embedding cosine down to {cosine.min():.6f}")


def compare_batch(
    report: ParityReport, name: str, reference: BatchOutputs, candidate: BatchOutputs, size: int
) -> None:
    """Compare the outputs of one batch whose input's longer side is ``size`` pixels."""
    for index in range(reference[1].shape[0]):
        _compare_image(
            report,
            f"{name} image {index}",
            tuple(output[index] for output in reference),
            tuple(output[index] for output in candidate),
            size,
        )
        report.images += 1
    report.batches += 1


def compare_query_embeddings(
    report: ParityReport, name: str, reference: np.ndarray, candidate: np.ndarray
) -> None:
    """Compare (R, D) embeddings of the same boxes."""
    if reference.shape != candidate.shape:
        report.failures.append(f"{name}: embeddings {reference.shape} vs {candidate.shape}")
        return
    cosine = _cosine(reference, candidate)
    report.query_embeddings += len(cosine)
    report.min_cosine = min(report.min_cosine, float(cosine.min(initial=1.0)))
    if (cosine < report.tolerances.cosine).any():
        report.failures.append(f"{name}: query embedding cosine down to {cosine.min():.6f}")


def eager_detect(model: nn.Module) -> DetectFn:
    """The PyTorch model as a batch -> numpy outputs function."""

    def run(images: Tensor, image_sizes: Tensor) -> BatchOutputs:
        with torch.no_grad():
            detections = model(images, image_sizes=image_sizes)
        return tuple(t.float().numpy() for t in detections)  # type: ignore[return-value]

    return run


def eager_embed(model: nn.Module) -> EmbedFn:
    """``model.embed_boxes`` on one image and its (R, 4) boxes, as numpy."""

    def run(image: Tensor, boxes: Tensor, image_sizes: Tensor) -> np.ndarray:
        with torch.no_grad():
            return model.embed_boxes(image, [boxes], image_sizes=image_sizes).float().numpy()

    return run


def check_parity(
    reference: DetectFn,
    candidate: DetectFn,
    batches: Sequence[PaddedBatch],
    tolerances: Tolerances | None = None,
    queries: Sequence[tuple[PaddedBatch, Tensor]] = (),
    reference_embed: EmbedFn | None = None,
    candidate_embed: EmbedFn | None = None,
) -> ParityReport:
    """Run both backends on every batch (and on every (one-image batch, boxes) query when
    both embed functions are given) and compare them (see the module docstring)."""
    report = ParityReport(tolerances or Tolerances())
    for index, batch in enumerate(batches):
        size = max(batch.images.shape[-2:])
        compare_batch(report, f"batch {index}", reference(*batch), candidate(*batch), size)
    if reference_embed is not None and candidate_embed is not None:
        for index, ((image, image_sizes), boxes) in enumerate(queries):
            compare_query_embeddings(
                report,
                f"query {index}",
                reference_embed(image, boxes, image_sizes),
                candidate_embed(image, boxes, image_sizes),
            )
    return report


def synthetic_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 images (H, W, 3) of the given sizes: smooth random blobs, so that a network
    sees structure at every scale (pure noise averages out in deep features)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        coarse = torch.from_numpy(rng.random((1, 3, 6, 8), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(
            coarse, size=(height, width), mode="bicubic", align_corners=False
        )[0]
        detail = torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
        pixels = (0.8 * smooth + 0.2 * detail).clamp(0, 1) * 255
        images.append(pixels.permute(1, 2, 0).round().to(torch.uint8).numpy())
    return images


def parity_inputs(
    preprocess: PreprocessConfig, seed: int = 0
) -> tuple[list[PaddedBatch], list[tuple[PaddedBatch, Tensor]]]:
    """The default parity inputs for a model: a batch of two images of different sizes and
    aspect ratios (padded together), a batch of one, and queries of one image with two boxes."""
    short, long = preprocess.min_size, preprocess.max_size
    sizes = [(short, long), (long, short), (short * 3 // 4, short)]
    images = [normalize_and_resize(image, preprocess)[0] for image in synthetic_images(sizes, seed)]
    divisor = preprocess.size_divisor
    batches = [pad_batch(images[:2], divisor), pad_batch(images[2:], divisor)]
    query = pad_batch(images[2:], divisor)
    height, width = images[2].shape[-2:]
    boxes = torch.tensor(
        [
            [0.1 * width, 0.05 * height, 0.4 * width, 0.9 * height],
            [0.5 * width, 0.2 * height, 0.95 * width, 0.99 * height],
        ]
    )
    return batches, [(query, boxes)]


def onnxruntime_detect(path: str) -> DetectFn:
    """An exported detect graph in ONNX Runtime (CPU), as a batch -> numpy outputs function."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images: Tensor, image_sizes: Tensor) -> BatchOutputs:
        inputs = {"images": images.numpy(), "image_sizes": image_sizes.float().numpy()}
        boxes, scores, embeddings = session.run(None, inputs)
        return boxes, scores, embeddings

    return run


def onnxruntime_embed(path: str) -> EmbedFn:
    """An exported embed graph in ONNX Runtime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(image: Tensor, boxes: Tensor, image_sizes: Tensor) -> np.ndarray:
        inputs = {
            "images": image.numpy(),
            "boxes": boxes.numpy(),
            "image_sizes": image_sizes.float().numpy(),
        }
        return session.run(None, inputs)[0]

    return run
