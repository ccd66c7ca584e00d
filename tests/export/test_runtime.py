"""The runtime Engine: the same answers on every backend, boxes in the images' own pixels,
query embeddings, and clear errors."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from export.artifact import ArtifactError, GraphFiles, Manifest, read_manifest, write_manifest
from export.parity import ParityReport, Tolerances, compare_batch, synthetic_images
from export.runtime import (
    BackendUnavailableError,
    Engine,
    EngineInfo,
    load_engine,
)
from models.preprocess import PreprocessConfig

# Three sizes and aspect ratios, batched together by detect.
IMAGE_SIZES = [(150, 200), (260, 180), (90, 300)]


@pytest.mark.parametrize("family", ["alignps", "fcos", "leaps"])
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


def test_engine_info_names_the_model_and_where_it_runs(exported):
    model_dir = exported("alignps").model_dir
    info = load_engine(model_dir, "onnxruntime").info
    manifest = read_manifest(model_dir)
    assert info == EngineInfo("alignps", manifest.fingerprint, 64, "onnxruntime", "cpu")
    assert load_engine(model_dir).info.backend == "onnxruntime"  # auto: ONNX Runtime first


class RecordingRunner:
    """A backend with fixed outputs in input pixels, recording what it is given."""

    def __init__(self, boxes, scores, embeddings):
        self.outputs = (
            np.asarray(boxes, np.float32)[None],
            np.asarray(scores, np.float32)[None],
            np.asarray(embeddings, np.float32)[None],
        )
        self.batches, self.queries = [], []

    def detect(self, images):
        self.batches.append(images.shape)
        return self.outputs

    def embed_boxes(self, image, boxes):
        self.batches.append(image.shape)
        self.queries.append(boxes)
        return np.ones((len(boxes), 2), np.float32)


def engine_with(runner, embeds_boxes=False, min_input_side=33) -> Engine:
    """min_size 160 and max_size 224: a 100 x 200 image is scaled by min(160/100, 224/200) =
    1.12, to 112 x 224."""
    manifest = Manifest(
        psearch_version="test",
        name="fake",
        config={},
        preprocess=PreprocessConfig(min_size=160, max_size=224),
        embedding_dim=2,
        embeds_boxes=embeds_boxes,
        fingerprint="sha256:0",
        onnx=GraphFiles(
            opset=19, min_input_side=min_input_side, inputs=["images"], outputs=["boxes"]
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
    manifest = read_manifest(folder)
    manifest.onnx = None
    write_manifest(manifest, folder)
    with pytest.raises(ArtifactError, match="no ONNX graphs"):
        load_engine(folder, "onnxruntime")
    assert load_engine(folder).info.backend == "torch"  # auto falls back to PyTorch


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
