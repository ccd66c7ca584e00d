"""Run an exported model folder behind one interface, whatever the backend.

``load_engine(MODEL_DIR, backend, device)`` returns an :class:`Engine`:

- ``detect(images)``: RGB uint8 images (H, W, 3) of any sizes -> one :class:`ImageDetections` of
  numpy arrays per image, in the image's own pixels, sorted by score, unused slots dropped
  (thresholding is the caller's: the gallery keeps what it wants).
- ``embed_query(image, box=None)``: the (D,) embedding of the person in ``box`` (x1, y1, x2, y2
  in the image's pixels; None = the whole image is the person crop). RoI models embed the box
  itself; the others take the embedding of the detection with the highest IoU with the box
  (the evaluation protocol's "max-IoU" mode).
- ``info``: name, fingerprint, embedding dim, backend, device.

Every backend gets the same preprocessed batch (``models/preprocess.py``: resize, normalise,
pad to a multiple of 32 and to the graph's smallest input side) with each image's size in it
(``image_sizes``, so that an image's results do not depend on the padding or on the other images
of its batch), so their answers differ only by the arithmetic of the backends;
``export/parity.py`` states by how much.

Backends: ``torch`` (the PyTorch model from ``checkpoint.safetensors``), ``onnxruntime``
(``model.onnx``; CPU, or CUDA with onnxruntime-gpu) and ``tensorrt`` (``model.plugins.onnx``,
and ``embed.plugins.onnx`` for RoI models, as engines built for this GPU by ``export.tensorrt``;
needs TensorRT and an NVIDIA GPU, and its first load builds the engines, which takes minutes).
``auto`` is ONNX Runtime where it is installed for the device and the folder has its graphs,
else PyTorch. Graphs exported before ``image_sizes`` became an input are refused with a message
to re-export the folder.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from common.boxes import max_iou_pick
from export.artifact import (
    ArtifactError,
    GraphFiles,
    ModelManifest,
    load_model,
    read_model_manifest,
)
from models.preprocess import normalize_and_resize, pad_batch, unscale_boxes

Backend = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Device = Literal["cpu", "cuda"]
QueryMode = Literal["auto", "gt_box", "max_iou"]
BACKENDS = ("torch", "onnxruntime", "tensorrt")
GPU_EXTRA = "pip install 'psearch[gpu]'"
EXPORT_EXTRA = "pip install 'psearch[export]'"
OUTPUT_NAMES = ("boxes", "scores", "embeddings")
EMBED_OUTPUT = "embeddings"  # the embed graph's one output
# The graphs' (B, 2) float32 input of each image's (height, width) in the batch (export/onnx.py).
IMAGE_SIZES = "image_sizes"
# Images per TensorRT batch: the engine's optimization profile is built for up to this many.
MAX_TENSORRT_BATCH = 8
MAX_TENSORRT_QUERY_BOXES = 16  # boxes per embed call the TensorRT embed engine is built for


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (the message says what to install or change)."""


class ImageDetections(NamedTuple):
    """One image's detections, in numpy and in the image's own pixels (the share of one image
    of the model's batched ``models.types.Detections``, unused slots dropped): boxes (n, 4)
    x1 y1 x2 y2, scores (n,) in descending order, embeddings (n, D) L2-normalised."""

    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray


@dataclass(frozen=True)
class EngineInfo:
    """What an engine runs: the model (registry name, fingerprint, embedding dim) and where,
    and the detection threshold its folder recommends (None: the folder does not say)."""

    name: str
    fingerprint: str
    dim: int
    backend: str
    device: str
    detection_threshold: float | None = None


class _Runner(Protocol):
    """A backend: the exported model's two functions on preprocessed float32 arrays, with
    image_sizes (B, 2) float32 the (height, width) of each image in its padded batch."""

    def detect(
        self, images: np.ndarray, image_sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (B, 3, H, W) -> boxes (B, K, 4), scores (B, K), embeddings (B, K, D)."""
        ...

    def embed_boxes(
        self, image: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray
    ) -> np.ndarray:
        """image (1, 3, H, W), boxes (R, 4) in its pixels -> embeddings (R, D)."""
        ...


class TorchRunner:
    """The PyTorch model, eager."""

    def __init__(
        self, model_dir: Path, manifest: ModelManifest, device: Device, threads: int | None
    ):
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "backend 'torch' on device 'cuda': this PyTorch has no CUDA device "
                f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of PyTorch"
            )
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_model(model_dir, manifest).to(self.device)

    def detect(
        self, images: np.ndarray, image_sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.inference_mode():
            detections = self.model(
                torch.from_numpy(images).to(self.device),
                image_sizes=torch.from_numpy(image_sizes).to(self.device),
            )
        return tuple(t.float().cpu().numpy() for t in detections)  # type: ignore[return-value]

    def embed_boxes(
        self, image: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray
    ) -> np.ndarray:
        with torch.inference_mode():
            embeddings = self.model.embed_boxes(
                torch.from_numpy(image).to(self.device),
                [torch.from_numpy(boxes).to(self.device)],
                image_sizes=torch.from_numpy(image_sizes).to(self.device),
            )
        return embeddings.float().cpu().numpy()


class OnnxRuntimeRunner:
    """``model.onnx`` (and ``embed.onnx``) in ONNX Runtime."""

    def __init__(
        self, model_dir: Path, manifest: ModelManifest, device: Device, threads: int | None
    ):
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailableError(
                f"backend 'onnxruntime' needs the onnxruntime package: {EXPORT_EXTRA} "
                f"(CPU) or {GPU_EXTRA} (CUDA)"
            )
        import onnxruntime

        require_onnx_graphs(model_dir, manifest)
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
        if provider not in onnxruntime.get_available_providers():
            raise BackendUnavailableError(
                f"backend 'onnxruntime' on device '{device}': this onnxruntime "
                f"({onnxruntime.__version__}) has no {provider}; install onnxruntime-gpu: "
                f"{GPU_EXTRA}"
            )
        options = onnxruntime.SessionOptions()
        # The pool's threads stop spinning when a run returns (they still spin between the
        # operators of a run): spinning on, they would take the CPU from what runs between two
        # runs on the same cores, the next batch's preprocessing and a service's requests.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._new_session = lambda path: onnxruntime.InferenceSession(
            str(path), options, providers=[provider]
        )
        self.detect_session = self._session(model_dir / manifest.onnx.detect)
        embed = manifest.onnx.embed
        self.embed_session = self._session(model_dir / embed) if embed else None

    def _session(self, path: Path):
        if not path.is_file():
            raise ArtifactError(f"{path}: ONNX file not found; re-export the model folder")
        try:
            return self._new_session(path)
        except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph types
            reason = " ".join(str(error).split())[:300]
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it: {reason}") from None

    def detect(
        self, images: np.ndarray, image_sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inputs = {"images": images, IMAGE_SIZES: image_sizes}
        boxes, scores, embeddings = self.detect_session.run(None, inputs)
        return boxes, scores, embeddings

    def embed_boxes(
        self, image: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray
    ) -> np.ndarray:
        if self.embed_session is None:
            raise ArtifactError("this model folder has no embed graph")
        inputs = {"images": image, "boxes": boxes, IMAGE_SIZES: image_sizes}
        return self.embed_session.run(None, inputs)[0]


def whole_batch_sizes(batch: np.ndarray) -> np.ndarray:
    """The float32 ``image_sizes`` (B, 2) of a batch (B, 3, H, W) whose images fill it."""
    return np.tile(np.float32(batch.shape[-2:]), (batch.shape[0], 1))


def require_onnx_graphs(model_dir: Path, manifest: ModelManifest) -> GraphFiles:
    """The folder's ONNX graphs; refused when there are none, or when they were exported
    before ``image_sizes`` was an input: those scale LEAPS' proposals by the padded batch, so
    their answers would depend on the batch."""
    graphs = manifest.onnx
    if graphs is None:
        raise ArtifactError(
            f"{model_dir}: the manifest lists no ONNX graphs; export them with "
            "`psearch-export --format onnx`"
        )
    if IMAGE_SIZES not in graphs.inputs:
        raise ArtifactError(
            f"{model_dir}: its ONNX graphs take {graphs.inputs}, without {IMAGE_SIZES!r} "
            "(exported by an older psearch); re-export the folder with psearch-export"
        )
    return graphs


def tensorrt_settings(manifest: ModelManifest, batch_size: int) -> Any:
    """The engine's input shape ranges, from the model's preprocessing: a side is at most
    ``max_size`` (rounded up to the padding multiple), at least the graph's smallest input
    side, and TensorRT tunes for a full batch of ``min_size x max_size`` landscape images;
    ``image_sizes`` has one (height, width) row per image."""
    from export.tensorrt import BuildSettings, InputShapes

    pre = manifest.preprocess

    def padded(side: int) -> int:
        return -(-side // pre.size_divisor) * pre.size_divisor

    smallest = padded(manifest.onnx.min_input_side if manifest.onnx else 1)
    largest = padded(pre.max_size)
    typical = (padded(min(pre.min_size, pre.max_size)), largest)
    shapes = InputShapes(
        min=(1, 3, smallest, smallest),
        opt=(batch_size, 3, *typical),
        max=(batch_size, 3, largest, largest),
    )
    sizes = InputShapes(min=(1, 2), opt=(batch_size, 2), max=(batch_size, 2))
    return BuildSettings(input_shapes={"images": shapes, IMAGE_SIZES: sizes})


def tensorrt_embed_settings(manifest: ModelManifest) -> Any:
    """The embed engine's shape ranges: one image (sides as in :func:`tensorrt_settings`) and
    1 to ``MAX_TENSORRT_QUERY_BOXES`` boxes, tuned for one (a query)."""
    from export.tensorrt import BuildSettings, InputShapes

    detect = tensorrt_settings(manifest, batch_size=1).input_shapes
    boxes = InputShapes(min=(1, 4), opt=(1, 4), max=(MAX_TENSORRT_QUERY_BOXES, 4))
    return BuildSettings(
        input_shapes={"images": detect["images"], "boxes": boxes, IMAGE_SIZES: detect[IMAGE_SIZES]}
    )


def ensure_tensorrt_engines(model_dir: Path, manifest: ModelManifest) -> dict[str, Path]:
    """The TensorRT engines of a model folder for this GPU, built unless cached
    (``export.tensorrt.ensure_engine``): ``detect``, and ``embed`` for models that embed given
    boxes. A folder without ONNX graphs, or exported before ``image_sizes``, is refused."""
    graphs = require_onnx_graphs(model_dir, manifest)
    from export.tensorrt import ensure_engine
    from export.tensorrt.plugins import UnsupportedDriverError

    builds = {"detect": (graphs.detect_plugins, tensorrt_settings(manifest, MAX_TENSORRT_BATCH))}
    if graphs.embed_plugins is not None:
        builds["embed"] = (graphs.embed_plugins, tensorrt_embed_settings(manifest))
    try:
        return {
            name: ensure_engine(
                model_dir, fingerprint=manifest.fingerprint, settings=settings, onnx_name=onnx_name
            )
            for name, (onnx_name, settings) in builds.items()
        }
    except UnsupportedDriverError as error:  # the plugins' PTX needs a newer driver
        raise BackendUnavailableError(f"backend 'tensorrt': {error}") from None


class TensorRTRunner:
    """The plugin graphs (``model.plugins.onnx``, and ``embed.plugins.onnx`` for RoI models) as
    TensorRT engines built for this GPU and cached in the model folder (``export.tensorrt``);
    built on first use, which takes minutes."""

    def __init__(
        self, model_dir: Path, manifest: ModelManifest, device: Device, threads: int | None
    ):
        from export.tensorrt import TensorRTUnavailableError, require_tensorrt

        require_onnx_graphs(model_dir, manifest)  # before TensorRT: a fix the user can make
        try:
            require_tensorrt()
        except TensorRTUnavailableError as error:
            raise BackendUnavailableError(f"backend 'tensorrt': {error}") from None
        if device != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(
                "backend 'tensorrt' runs on an NVIDIA GPU: use device='cuda' on a machine with one"
            )
        from export.tensorrt import load_engine as load_tensorrt_engine

        self.engines = {
            name: load_tensorrt_engine(path, fingerprint=manifest.fingerprint)
            for name, path in ensure_tensorrt_engines(model_dir, manifest).items()
        }

    def _run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return self.engines[engine](
            {name: torch.from_numpy(array).cuda() for name, array in inputs.items()}
        )

    def detect(
        self, images: np.ndarray, image_sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if images.shape[0] > MAX_TENSORRT_BATCH:
            raise ValueError(
                f"the TensorRT engine takes at most {MAX_TENSORRT_BATCH} images per batch"
            )
        outputs = self._run("detect", {"images": images, IMAGE_SIZES: image_sizes})
        return tuple(outputs[name].float().cpu().numpy() for name in OUTPUT_NAMES)  # type: ignore[return-value]

    def embed_boxes(
        self, image: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray
    ) -> np.ndarray:
        if "embed" not in self.engines:
            raise ArtifactError("this model folder has no embed graph")
        if not 1 <= boxes.shape[0] <= MAX_TENSORRT_QUERY_BOXES:
            raise ValueError(
                f"the TensorRT embed engine takes 1 to {MAX_TENSORRT_QUERY_BOXES} boxes per call, "
                f"got {boxes.shape[0]}"
            )
        inputs = {"images": image, "boxes": boxes, IMAGE_SIZES: image_sizes}
        return self._run("embed", inputs)[EMBED_OUTPUT].float().cpu().numpy()


_RUNNERS = {"torch": TorchRunner, "onnxruntime": OnnxRuntimeRunner, "tensorrt": TensorRTRunner}


def _auto_backend(manifest: ModelManifest, device: Device) -> str:
    """ONNX Runtime when the folder has its graphs and it is installed, else PyTorch."""
    if manifest.onnx is not None and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
        if provider in onnxruntime.get_available_providers():
            return "onnxruntime"
    return "torch"


class Engine:
    """A loaded model folder on one backend (see the module docstring)."""

    def __init__(self, manifest: ModelManifest, runner: _Runner, info: EngineInfo, batch_size: int):
        self.manifest = manifest
        self.info = info
        self.batch_size = batch_size
        self._runner = runner
        self._min_side = manifest.onnx.min_input_side if manifest.onnx else 1

    def _batch(self, pixels: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Pad preprocessed (3, h, w) images into one float32 batch, at least min_side high
        and wide (the smallest input the graphs were exported for), and the float32 (B, 2)
        (h, w) of each image in it."""
        divisor = self.manifest.preprocess.size_divisor
        batch, image_sizes = pad_batch(list(pixels), divisor)
        height, width = batch.shape[-2:]
        side = -(-self._min_side // divisor) * divisor
        if height < side or width < side:
            batch = torch.nn.functional.pad(
                batch, (0, max(side - width, 0), 0, max(side - height, 0))
            )
        return batch.numpy().astype(np.float32, copy=False), image_sizes.numpy().astype(np.float32)

    def _preprocess(self, image: np.ndarray) -> tuple[Tensor, tuple[float, float]]:
        return normalize_and_resize(image, self.manifest.preprocess)

    def forward(
        self, batch: np.ndarray, image_sizes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The backend alone, on a preprocessed batch (B, 3, H, W) (``models/preprocess.py``)
        and the (B, 2) (height, width) of each image in it (None: every image fills the
        batch): the model's fixed-size outputs boxes (B, K, 4) in the batch's pixels, scores
        (B, K), embeddings (B, K, D)."""
        if image_sizes is None:
            image_sizes = whole_batch_sizes(batch)
        return self._runner.detect(
            np.ascontiguousarray(batch, dtype=np.float32),
            np.ascontiguousarray(image_sizes, dtype=np.float32),
        )

    def detect(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        """Detections of every image (see the module docstring), batched ``batch_size`` at a
        time."""
        if isinstance(images, np.ndarray):
            raise TypeError("detect takes a list of (H, W, 3) uint8 images, not one array")
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared = [self._preprocess(image) for image in chunk]
            boxes, scores, embeddings = self._runner.detect(*self._batch([p for p, _ in prepared]))
            for index, (image, (_, scale)) in enumerate(zip(chunk, prepared, strict=True)):
                used = scores[index] > 0
                image_boxes = unscale_boxes(boxes[index][used], scale)
                height, width = image.shape[:2]
                np.clip(image_boxes, 0, [width, height, width, height], out=image_boxes)
                results.append(
                    ImageDetections(
                        image_boxes.astype(np.float32),
                        scores[index][used],
                        embeddings[index][used],
                    )
                )
        return results

    def embed_query(
        self,
        image: np.ndarray,
        box: Sequence[float] | np.ndarray | None = None,
        mode: QueryMode = "auto",
    ) -> np.ndarray:
        """The (D,) embedding of the person in ``box`` of ``image`` (None: the whole image).

        ``mode``: ``gt_box`` embeds the box (RoI models), ``max_iou`` takes the detection with
        the highest IoU with it; ``auto`` is ``gt_box`` where the model can, else ``max_iou``.
        """
        height, width = image.shape[:2] if isinstance(image, np.ndarray) else (0, 0)
        query = self._query_box(box, height, width)
        if mode == "auto":
            mode = "gt_box" if self.manifest.embeds_boxes else "max_iou"
        if mode == "gt_box":
            if not self.manifest.embeds_boxes:
                raise ValueError(
                    f"model {self.info.name!r} cannot embed a given box (no embed_boxes); "
                    "use mode='max_iou'"
                )
            pixels, scale = self._preprocess(image)
            scaled = np.asarray(query * np.asarray([*scale, *scale]), dtype=np.float32)
            batch, image_sizes = self._batch([pixels])
            return self._runner.embed_boxes(batch, scaled[None], image_sizes)[0]
        if mode != "max_iou":
            raise ValueError(f"mode must be 'auto', 'gt_box' or 'max_iou', got {mode!r}")
        detections = self.detect([image])[0]
        if len(detections.scores) == 0:
            raise ValueError("no person detected in the query image; cannot embed the query")
        return detections.embeddings[max_iou_pick(detections.boxes, query).index]

    @staticmethod
    def _query_box(box: Sequence[float] | np.ndarray | None, height: int, width: int) -> np.ndarray:
        if box is None:
            return np.asarray([0, 0, width, height], dtype=np.float64)
        query = np.asarray(box, dtype=np.float64)
        if query.shape != (4,) or not np.isfinite(query).all():
            raise ValueError(f"box must be 4 finite numbers x1, y1, x2, y2, got {box!r}")
        clipped = np.clip(query, 0, [width, height, width, height])
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise ValueError(
                f"box {query.tolist()} is empty inside the {width}x{height} image "
                "(expected x1 < x2 and y1 < y2 in the image's pixels)"
            )
        return clipped


def load_engine(
    path: str | Path,
    backend: Backend = "auto",
    device: Device = "cpu",
    *,
    batch_size: int = 4,
    threads: int | None = None,
) -> Engine:
    """Load a model folder written by ``psearch-export`` on a backend.

    Args:
        path: the model folder (with ``psearch.json``).
        backend: ``torch``, ``onnxruntime``, ``tensorrt`` or ``auto`` (ONNX Runtime when
            possible, else PyTorch).
        device: ``cpu`` or ``cuda``.
        batch_size: images per forward pass in ``detect``.
        threads: CPU threads of the backend (None: its default).

    Raises:
        ArtifactError: the folder is missing a file or is not a model folder.
        BackendUnavailableError: the backend cannot run here (says what to install).
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = Path(path)
    manifest = read_model_manifest(model_dir)
    chosen = _auto_backend(manifest, device) if backend == "auto" else backend
    runner = _RUNNERS[chosen](model_dir, manifest, device, threads)
    info = EngineInfo(
        name=manifest.name,
        fingerprint=manifest.fingerprint,
        dim=manifest.embedding_dim,
        backend=chosen,
        device=device,
        detection_threshold=manifest.detection_threshold,
    )
    return Engine(manifest, runner, info, batch_size)
