"""The runtime Engine: the same answers on every backend, boxes in the images' own pixels,
query embeddings, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

import export.tensorrt
from export.artifact import (
    ArtifactError,
    GraphFiles,
    ModelManifest,
    read_model_manifest,
    write_model_manifest,
)
from export.parity import ParityReport, Tolerances, compare_batch, synthetic_images
from export.runtime import (
    MAX_TENSORRT_BATCH,
    MAX_TENSORRT_QUERY_BOXES,
    BackendUnavailableError,
    Engine,
    EngineInfo,
    ensure_tensorrt_engines,
    load_engine,
)
from models.preprocess import PreprocessConfig

FAMILIES = ["alignps", "fcos", "leaps", "seqnet", "psarm"]

# Three sizes and aspect ratios, batched together by detect.
IMAGE_SIZES = [(150, 200), (260, 180), (90, 300)]


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_and_onnxruntime_backends_give_the_same_answers(exported, family):
    """Within the parity tolerances: boxes within 1e-3 of the image's longer side, scores
    within 1e-4, embeddings (detections' and queries') with cosine >= 0.9999."""
    model_dir = exported(family).model_dir
    engines = [load_engine(model_dir, backend, threads=1) for backend in ("torch", "onnxruntime")]
    images = synthetic_images(IMAGE_SIZES, seed=7)
    reference, candidate = (engine.detect(images) for engine in engines)
    report = ParityReport(Tolerances())
    for index, (image, ref, cand) in enumerate(zip(images, reference, candidate, strict=True)):
        batch = [output[None] for output in ref], [output[None] for output in cand]
        compare_batch(report, f"image {index}", *batch, size=max(image.shape[:2]))
    assert report.passed, report.summary()
    assert report.compared >= 3 * 10
    if engines[0].info.dim:
        box = [20, 10, 90, 140]
        queries = [engine.embed_query(images[0], box) for engine in engines]
        assert queries[0].shape == (engines[0].info.dim,)
        assert float(queries[0] @ queries[1]) >= 0.9999


def test_engine_info_names_the_model_where_it_runs_and_its_recommended_threshold(exported):
    model_dir = exported("alignps").model_dir
    info = load_engine(model_dir, "onnxruntime").info
    manifest = read_model_manifest(model_dir)
    assert info == EngineInfo("alignps", manifest.fingerprint, 64, "onnxruntime", "cpu", 0.15)
    assert load_engine(model_dir).info.backend == "onnxruntime"  # auto: ONNX Runtime first


def test_a_folder_exported_before_the_threshold_was_recorded_loads_recommending_none(
    exported, tmp_path
):
    folder = shutil.copytree(exported("alignps").model_dir, tmp_path / "model")
    manifest = json.loads((folder / "psearch.json").read_text())
    del manifest["detection_threshold"]
    (folder / "psearch.json").write_text(json.dumps(manifest))
    assert load_engine(folder, "onnxruntime").info.detection_threshold is None


class RecordingRunner:
    """A backend with fixed outputs in input pixels (the same for every image of a batch),
    recording what it is given."""

    def __init__(self, boxes, scores, embeddings):
        self.outputs = (
            np.asarray(boxes, np.float32)[None],
            np.asarray(scores, np.float32)[None],
            np.asarray(embeddings, np.float32)[None],
        )
        self.batches, self.image_sizes, self.queries = [], [], []

    def detect(self, images, image_sizes):
        self.batches.append(images.shape)
        self.image_sizes.append(image_sizes)
        return tuple(np.repeat(output, len(images), axis=0) for output in self.outputs)

    def embed_boxes(self, image, boxes, image_sizes):
        self.batches.append(image.shape)
        self.image_sizes.append(image_sizes)
        self.queries.append(boxes)
        return np.ones((len(boxes), 2), np.float32)


def engine_with(runner, embeds_boxes=False, min_input_side=33) -> Engine:
    """min_size 160 and max_size 224: a 100 x 200 image is scaled by min(160/100, 224/200) =
    1.12, to 112 x 224."""
    manifest = ModelManifest(
        psearch_version="test",
        name="fake",
        config={},
        preprocess=PreprocessConfig(min_size=160, max_size=224),
        embedding_dim=2,
        embeds_boxes=embeds_boxes,
        fingerprint="sha256:0",
        onnx=GraphFiles(
            opset=19,
            min_input_side=min_input_side,
            inputs=["images", "image_sizes"],
            outputs=["boxes"],
        ),
    )
    info = EngineInfo("fake", "sha256:0", 2, "fake", "cpu")
    return Engine(manifest, runner, info, batch_size=4)


def test_detections_come_back_in_the_images_own_pixels():
    """Input pixels / 1.12 are the image's; a box reaching into the padding is clipped to the
    image; the unused slot (score 0) is dropped."""
    runner = RecordingRunner(
        boxes=[[11.2, 22.4, 112.0, 56.0], [200.0, 100.8, 240.0, 134.4], [0, 0, 0, 0]],
        scores=[0.9, 0.4, 0.0],
        embeddings=[[1, 0], [0, 1], [0, 0]],
    )
    image = np.zeros((100, 200, 3), np.uint8)
    (detections,) = engine_with(runner).detect([image])
    np.testing.assert_allclose(
        detections.boxes, [[10, 20, 100, 50], [200 / 1.12, 90, 200, 100]], rtol=1e-5
    )
    np.testing.assert_array_equal(detections.scores, np.float32([0.9, 0.4]))
    np.testing.assert_array_equal(detections.embeddings, [[1, 0], [0, 1]])
    assert runner.batches == [(1, 3, 128, 224)]  # 112 x 224 padded to multiples of 32


def test_batches_are_padded_to_the_smallest_side_the_graph_was_exported_for():
    runner = RecordingRunner([[0, 0, 1, 1]], [0.5], [[1, 0]])
    engine_with(runner, min_input_side=250).detect([np.zeros((100, 200, 3), np.uint8)])
    assert runner.batches == [(1, 3, 256, 256)]  # 250 rounded up to a multiple of 32
    np.testing.assert_array_equal(runner.image_sizes, [[[112, 224]]])  # the image, unpadded


def test_the_backend_is_told_where_each_image_lies_in_its_padded_batch():
    """100 x 200 and 200 x 100 images resize to 112 x 224 and 224 x 112 (scale 1.12) and pad
    together to 224 x 224; a query image alone to 128 x 224. Sizes are float32 (height, width)."""
    runner = RecordingRunner([[0, 0, 1, 1]], [0.5], [[1, 0]])
    engine = engine_with(runner, embeds_boxes=True)
    engine.detect([np.zeros((100, 200, 3), np.uint8), np.zeros((200, 100, 3), np.uint8)])
    engine.embed_query(np.zeros((100, 200, 3), np.uint8), [10, 20, 100, 50])
    assert runner.batches == [(2, 3, 224, 224), (1, 3, 128, 224)]
    np.testing.assert_array_equal(runner.image_sizes[0], [[112, 224], [224, 112]])
    np.testing.assert_array_equal(runner.image_sizes[1], [[112, 224]])
    assert all(sizes.dtype == np.float32 for sizes in runner.image_sizes)


def test_forward_on_a_batch_without_sizes_takes_every_image_as_filling_it():
    runner = RecordingRunner([[0, 0, 1, 1]], [0.5], [[1, 0]])
    engine_with(runner).forward(np.zeros((2, 3, 64, 96), np.float32))
    np.testing.assert_array_equal(runner.image_sizes, [[[64, 96], [64, 96]]])


def test_a_detector_embeds_a_query_with_its_best_overlapping_detection():
    """Detections [0, 0, 40, 40] (embedding e1) and [50, 0, 200, 100] (e2), in original
    pixels (input pixels are 1.12 times larger). The box [60, 10, 190, 90] overlaps the second
    only; the whole image (box None) overlaps the second most (IoU 0.75 vs 0.08)."""
    runner = RecordingRunner(
        boxes=np.float32([[0, 0, 40, 40], [50, 0, 200, 100]]) * 1.12,
        scores=[0.9, 0.8],
        embeddings=[[1, 0], [0, 1]],
    )
    engine = engine_with(runner)
    image = np.zeros((100, 200, 3), np.uint8)
    np.testing.assert_array_equal(engine.embed_query(image, [60, 10, 190, 90]), [0, 1])
    np.testing.assert_array_equal(engine.embed_query(image, [0, 0, 30, 30]), [1, 0])
    np.testing.assert_array_equal(engine.embed_query(image), [0, 1])


def test_a_roi_model_embeds_the_query_box_itself_in_input_pixels():
    runner = RecordingRunner([[0, 0, 1, 1]], [0.5], [[1, 0]])
    engine = engine_with(runner, embeds_boxes=True)
    image = np.zeros((100, 200, 3), np.uint8)
    engine.embed_query(image, [10, 20, 100, 50])
    engine.embed_query(image)  # the whole image
    np.testing.assert_allclose(runner.queries[0], [[11.2, 22.4, 112.0, 56.0]], rtol=1e-6)
    np.testing.assert_allclose(runner.queries[1], [[0, 0, 224, 112]], rtol=1e-6)
    np.testing.assert_array_equal(engine.embed_query(image, [10, 20, 100, 50], "max_iou"), [1, 0])


def test_bad_queries_and_images_are_refused_with_a_reason():
    engine = engine_with(RecordingRunner([[0, 0, 1, 1]], [0.0], [[1, 0]]))
    image = np.zeros((100, 200, 3), np.uint8)
    with pytest.raises(ValueError, match="4 finite numbers"):
        engine.embed_query(image, [0, 0, 10])
    with pytest.raises(ValueError, match="empty inside the 200x100 image"):
        engine.embed_query(image, [250, 0, 300, 50])
    with pytest.raises(ValueError, match="cannot embed a given box"):
        engine.embed_query(image, mode="gt_box")
    with pytest.raises(ValueError, match="no person detected"):
        engine.embed_query(image)
    with pytest.raises(ValueError, match=r"uint8 RGB array"):
        engine.detect([image.astype(np.float32)])
    with pytest.raises(TypeError, match="list of"):
        engine.detect(image)


def test_loading_something_that_is_not_a_model_folder_says_so(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        load_engine(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="psearch-export"):
        load_engine(tmp_path)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_engine(tmp_path, backend="openvino")
    with pytest.raises(ValueError, match="device must be"):
        load_engine(tmp_path, device="tpu")


def test_a_missing_onnx_file_or_section_is_reported(exported, tmp_path):
    folder = shutil.copytree(exported("alignps").model_dir, tmp_path / "model")
    (folder / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model.onnx: ONNX file not found"):
        load_engine(folder, "onnxruntime")
    manifest = read_model_manifest(folder)
    manifest.onnx = None
    write_model_manifest(manifest, folder)
    with pytest.raises(ArtifactError, match="no ONNX graphs"):
        load_engine(folder, "onnxruntime")
    assert load_engine(folder).info.backend == "torch"  # auto falls back to PyTorch


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_graphs_exported_without_image_sizes_are_refused_with_the_fix(exported, tmp_path, backend):
    """Graphs from before image_sizes (the manifest an older psearch wrote lists the inputs) ran
    LEAPS' proposals over the padding: one line says to re-export, on every graph backend. The
    PyTorch backend builds the model from the weights and still runs."""
    folder = shutil.copytree(exported("leaps").model_dir, tmp_path / "model")
    manifest = read_model_manifest(folder)
    manifest.onnx.inputs = ["images"]
    write_model_manifest(manifest, folder)
    with pytest.raises(ArtifactError, match=r"without 'image_sizes'.*re-export") as refused:
        load_engine(folder, backend, "cuda" if backend == "tensorrt" else "cpu")
    assert "\n" not in str(refused.value)
    assert len(load_engine(folder, "torch").detect([np.zeros((64, 64, 3), np.uint8)])) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_tensorrt_without_tensorrt_says_what_to_install(exported):
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*pip install"):
        load_engine(exported("alignps").model_dir, "tensorrt", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_says_so(exported):
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        load_engine(exported("alignps").model_dir, "torch", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider.*onnxruntime-gpu"):
        load_engine(exported("alignps").model_dir, "onnxruntime", "cuda")


def test_a_roi_model_gets_a_tensorrt_engine_for_each_graph(exported, monkeypatch):
    """Box queries of RoI models run on their own engine: one image, 1 to 16 boxes."""
    built = {}

    def ensure_engine(model_dir, *, fingerprint, settings, onnx_name):
        built[onnx_name] = settings.input_shapes
        return model_dir / f"{onnx_name}.engine"

    # TensorRT "present" for the package's lazy names; the engine step records instead of
    # building (set in the namespace directly: reading the lazy name would import the builder).
    monkeypatch.setattr(export.tensorrt, "require_tensorrt", lambda: None)
    monkeypatch.setitem(vars(export.tensorrt), "ensure_engine", ensure_engine)
    model_dir = exported("alignps").model_dir
    detector = read_model_manifest(model_dir)
    assert sorted(ensure_tensorrt_engines(model_dir, detector)) == ["detect"]

    roi_model = detector.model_copy(deep=True)  # as a model with embed_boxes exports it
    roi_model.onnx.embed_plugins = "embed.plugins.onnx"
    built.clear()
    assert sorted(ensure_tensorrt_engines(model_dir, roi_model)) == ["detect", "embed"]
    assert sorted(built) == ["embed.plugins.onnx", "model.plugins.onnx"]
    embed = built["embed.plugins.onnx"]
    assert embed["images"].max[0] == embed["image_sizes"].max[0] == 1
    assert (embed["boxes"].min, embed["boxes"].max) == ((1, 4), (MAX_TENSORRT_QUERY_BOXES, 4))
    assert built["model.plugins.onnx"]["images"].max[0] == MAX_TENSORRT_BATCH
