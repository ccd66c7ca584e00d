"""The model folder: manifest, weights, fingerprint, and the errors for folders that are not
what they should be."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import safetensors.torch
import torch
import yaml

from export.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    fingerprint,
    load_model,
    load_run,
    read_model_manifest,
    run_detection_threshold,
)
from export.onnx import OPSET, OUTPUT_NAMES
from models.alignps import AlignPS


def test_fingerprint_hashes_named_tensors_in_name_order_then_the_canonical_config():
    """The recipe, step by step: per tensor in name order a JSON header [name, dtype, shape]
    and its raw bytes (float32 1.0 is 00 00 80 3f, little-endian), then the config as JSON
    with sorted keys and no spaces."""
    state = {"b": torch.tensor([1.0]), "a": torch.tensor([[2]], dtype=torch.int64)}
    config = {"name": "x", "depth": [1, 2]}
    digest = hashlib.sha256()
    digest.update(b'["a","torch.int64",[1,1]]')
    digest.update(bytes([2, 0, 0, 0, 0, 0, 0, 0]))
    digest.update(b'["b","torch.float32",[1]]')
    digest.update(bytes([0x00, 0x00, 0x80, 0x3F]))
    digest.update(b'{"depth":[1,2],"name":"x"}')
    assert fingerprint(state, config) == f"sha256:{digest.hexdigest()}"


def test_fingerprint_changes_with_any_weight_or_config_value_but_not_with_key_order():
    state = {"w": torch.zeros(3), "v": torch.ones(2)}
    config = {"name": "x", "size": 3}
    reference = fingerprint(state, config)
    assert fingerprint(dict(reversed(state.items())), dict(reversed(config.items()))) == reference
    assert fingerprint({**state, "w": torch.tensor([0.0, 0.0, 1e-7])}, config) != reference
    assert fingerprint(state, {**config, "size": 4}) != reference
    assert fingerprint({**state, "w": torch.zeros(3, dtype=torch.float64)}, config) != reference


def test_the_manifest_describes_the_model(exported):
    result = exported("alignps")
    manifest = read_model_manifest(result.model_dir)
    model = result.model
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.name == "alignps"
    assert manifest.preprocess == model.preprocess
    assert manifest.embedding_dim == model.embedding_dim == 64
    assert manifest.embeds_boxes is False
    assert manifest.config["backbone"]["pretrained"] is None  # a path from another machine
    assert manifest.fingerprint == fingerprint(model.state_dict(), manifest.config)
    assert manifest.psearch_version
    assert manifest.onnx.opset == OPSET
    assert manifest.onnx.inputs == ["images", "image_sizes"]
    assert manifest.onnx.outputs == list(OUTPUT_NAMES)
    assert manifest.onnx.min_input_side == 33  # a stride-32 map of more than one row


def test_the_manifest_recommends_the_detection_threshold_the_run_evaluates_with(exported):
    """configs/tiny/alignps_synthetic.yaml evaluates at eval.det_thresh 0.15: the service and
    the indexer store persons from that score on, unless told otherwise."""
    result = exported("alignps")
    assert read_model_manifest(result.model_dir).detection_threshold == 0.15
    assert "recommended detection threshold 0.15" in result.printed


@pytest.mark.parametrize(
    ("evaluation", "expected"),
    [({"det_thresh": 0.3}, 0.3), ({"det_thresh": 0}, 0.0), ({}, None), (None, None)],
)
def test_the_threshold_is_read_from_the_run_config(tmp_path, evaluation, expected):
    config = {"model": {}} if evaluation is None else {"model": {}, "eval": evaluation}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert run_detection_threshold(tmp_path) == expected


@pytest.mark.parametrize(("value", "message"), [(1.5, r"in \[0, 1\]"), ("high", "a number")])
def test_a_threshold_that_is_no_score_is_refused(tmp_path, value, message):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"eval": {"det_thresh": value}}))
    with pytest.raises(ArtifactError, match=message):
        run_detection_threshold(tmp_path)


def test_the_model_folder_rebuilds_the_same_model(exported):
    result = exported("alignps")
    loaded = load_model(result.model_dir)
    assert isinstance(loaded, AlignPS) and not loaded.training
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_modified_weights_are_refused(exported, tmp_path):
    folder = shutil.copytree(exported("alignps").model_dir, tmp_path / "model")
    weights = folder / "checkpoint.safetensors"
    state = safetensors.torch.load_file(str(weights))
    name = next(key for key in state if key.endswith("weight"))
    state[name] = state[name] + 1e-3
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_model(folder)


def test_reading_a_folder_that_is_not_a_model_folder_says_so(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        read_model_manifest(tmp_path / "missing")
    with pytest.raises(ArtifactError, match=r"no psearch.json"):
        read_model_manifest(tmp_path)
    (tmp_path / "psearch.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_model_manifest(tmp_path)
    (tmp_path / "psearch.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="re-export"):
        read_model_manifest(tmp_path)
    (tmp_path / "psearch.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(ArtifactError, match="invalid manifest"):
        read_model_manifest(tmp_path)


def test_reading_a_folder_that_is_not_a_run_folder_says_so(exported, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(ArtifactError, match=r"no config.yaml"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {}}))
    with pytest.raises(ArtifactError, match="no 'model' section"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "nope"}}))
    with pytest.raises(ArtifactError, match="unknown model name"):
        load_run(tmp_path)
    # AlignPS's config with FCOS's weights.
    shutil.copy(exported("alignps").run_dir / "config.yaml", tmp_path / "config.yaml")
    shutil.copy(exported("fcos").run_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ArtifactError, match="weights do not fit the model"):
        load_run(tmp_path)
