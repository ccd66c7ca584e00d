"""The exported model folder, its manifest ``psearch.json`` and the model fingerprint.

::

    MODEL_DIR/
        psearch.json              the manifest (:class:`ModelManifest`)
        checkpoint.safetensors    the weights (what the PyTorch backend loads)
        model.onnx                portable graph, opset 19, standard ops only
        model.plugins.onnx        the same with psearch:: plugin nodes (TensorRT)
        embed.onnx                RoI models only: (image, boxes) -> embeddings
        embed.plugins.onnx        the same with plugin nodes

The fingerprint identifies what a model computes: a SHA-256 over every tensor of the weights
(name, dtype, shape, bytes, in name order) and the model config as canonical JSON. Galleries
record it; two exports of the same checkpoint have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import Field, ValidationError
from torch import nn

import models
from common.config_files import ConfigFileError, read_yaml_mapping
from common.files import write_atomically, write_text_atomically
from common.run_folder import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE
from models.config import StrictModel
from models.preprocess import PreprocessConfig

MODEL_MANIFEST_FILE = "psearch.json"
MODEL_WEIGHTS_FILE = "checkpoint.safetensors"
ONNX_FILE = "model.onnx"
PLUGIN_ONNX_FILE = "model.plugins.onnx"
EMBED_ONNX_FILE = "embed.onnx"
EMBED_PLUGIN_ONNX_FILE = "embed.plugins.onnx"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A run folder or model folder is missing a file, or its files do not fit together."""


class GraphFiles(StrictModel):
    """The ONNX files of an export (paths relative to the model folder)."""

    opset: int = Field(description="ONNX opset of every graph.")
    min_input_side: int = Field(
        1, ge=1, description="Smallest input height / width the graphs were exported for."
    )
    detect: str = Field(ONNX_FILE, description="images -> boxes, scores, embeddings.")
    detect_plugins: str = Field(PLUGIN_ONNX_FILE, description="The same with plugin nodes.")
    embed: str | None = Field(None, description="RoI models: (images, boxes) -> embeddings.")
    embed_plugins: str | None = Field(None, description="The same with plugin nodes.")
    inputs: list[str] = Field(description="Input names of the detect graph.")
    outputs: list[str] = Field(description="Output names of the detect graph.")
    embed_inputs: list[str] = Field(default_factory=list, description="Inputs of the embed graph.")
    embed_outputs: list[str] = Field(
        default_factory=list, description="Outputs of the embed graph."
    )


class ParityRecord(StrictModel):
    """What the export's parity check measured (ONNX Runtime CPU vs PyTorch eager)."""

    passed: bool
    compared: int = Field(description="Detections compared.")
    max_box_error: float = Field(description="Largest box difference / input size.")
    max_score_error: float = Field(description="Largest score difference.")
    min_cosine: float = Field(description="Smallest embedding cosine similarity.")


class ModelManifest(StrictModel):
    """``psearch.json``: everything needed to run a model folder and to recognise its model."""

    format_version: int = Field(FORMAT_VERSION, description="Version of this manifest format.")
    psearch_version: str = Field(description="psearch version that exported the model.")
    name: str = Field(description="Model registry name (models.MODELS).")
    config: dict[str, Any] = Field(description="The model config; models.build_model builds it.")
    preprocess: PreprocessConfig = Field(description="Input preprocessing (models/preprocess.py).")
    embedding_dim: int = Field(ge=0, description="Length of the re-id embedding (0: detector).")
    embeds_boxes: bool = Field(description="Whether the model embeds given boxes (RoI model).")
    fingerprint: str = Field(description="sha256:<hex> of the weights and canonical config.")
    weights: str = Field(MODEL_WEIGHTS_FILE, description="Weights file (safetensors).")
    onnx: GraphFiles | None = Field(None, description="The ONNX graphs, when exported.")
    parity: ParityRecord | None = Field(None, description="The export's parity check.")
    detection_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The detection score from which a detection is a person, as the training "
        "run evaluated the model (its config's eval.det_thresh): the default of the service "
        "and the indexer. None in folders exported before it was recorded.",
    )


def psearch_version() -> str:
    try:
        return importlib.metadata.version("psearch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data, equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(state: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """``sha256:<hex>`` of every tensor (name, dtype, shape, bytes; in name order) and the
    canonical JSON of the config."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        header = canonical_json([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(canonical_json(config).encode())
    return f"sha256:{digest.hexdigest()}"


def portable_config(model: nn.Module) -> dict[str, Any]:
    """The model's config as JSON data, without the local ImageNet weights path: the weights
    travel in the folder, and the path would not exist where the model is deployed."""
    config = model.config.model_dump(mode="json")
    backbone = config.get("backbone")
    if isinstance(backbone, dict) and "pretrained" in backbone:
        backbone["pretrained"] = None
    return config


def build_manifest(model: nn.Module, detection_threshold: float | None = None) -> ModelManifest:
    """The manifest of a model (without ONNX files or parity yet), recommending
    ``detection_threshold`` (:func:`run_detection_threshold`)."""
    config = portable_config(model)
    return ModelManifest(
        psearch_version=psearch_version(),
        name=config["name"],
        config=config,
        preprocess=model.preprocess,
        embedding_dim=int(model.embedding_dim),
        embeds_boxes=callable(getattr(model, "embed_boxes", None)),
        fingerprint=fingerprint(model.state_dict(), config),
        detection_threshold=detection_threshold,
    )


def build_model(config: dict[str, Any]) -> nn.Module:
    """``models.build_model`` without loading ImageNet weights (trained weights follow)."""
    config = json.loads(json.dumps(config))  # a deep copy
    backbone = config.get("backbone")
    if isinstance(backbone, dict):
        backbone["pretrained"] = None
    return models.build_model(config)


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path}: weights file not found")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except (RuntimeError, safetensors.SafetensorError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ArtifactError(f"{path}: weights do not fit the model: {reason}") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: weights do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_run(run_dir: Path) -> nn.Module:
    """The model of a training run folder (``common/run_folder.py``: ``config.yaml`` and
    ``model.safetensors``), in eval mode on CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: not a directory (expected a training run folder)")
    config_path = run_dir / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise ArtifactError(f"{run_dir}: no {RUN_CONFIG_FILE}; is it a training run folder?")
    try:
        data = read_yaml_mapping(config_path, "run config")
    except ConfigFileError as error:
        raise ArtifactError(str(error)) from None
    if not isinstance(data.get("model"), dict):
        raise ArtifactError(f"{config_path}: no 'model' section")
    model = _build_checked(data["model"], str(config_path))
    _load_weights(model, run_dir / RUN_WEIGHTS_FILE)
    return model.eval()


def run_detection_threshold(run_dir: Path) -> float | None:
    """The detection threshold a training run evaluates with (``eval.det_thresh`` of its
    ``config.yaml``), which its exported folder recommends; None when the config has none."""
    config_path = Path(run_dir) / RUN_CONFIG_FILE
    try:
        data = read_yaml_mapping(config_path, "run config")
    except ConfigFileError as error:
        raise ArtifactError(str(error)) from None
    evaluation = data.get("eval")
    threshold = evaluation.get("det_thresh") if isinstance(evaluation, dict) else None
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ArtifactError(f"{config_path}: eval.det_thresh must be a number, got {threshold!r}")
    if not 0 <= threshold <= 1:
        raise ArtifactError(f"{config_path}: eval.det_thresh must be in [0, 1], got {threshold}")
    return float(threshold)


def _build_checked(config: dict[str, Any], source: str) -> nn.Module:
    try:
        return build_model(config)
    except (ValidationError, ValueError) as error:
        reason = " ".join(str(error).split())[:500]
        raise ArtifactError(f"{source}: invalid model config: {reason}") from None


def write_weights(model: nn.Module, directory: Path, manifest: ModelManifest) -> Path:
    """``checkpoint.safetensors`` with the fingerprint and config in its metadata."""
    path = directory / manifest.weights
    metadata = {
        "fingerprint": manifest.fingerprint,
        "model_config": canonical_json(manifest.config),
    }
    write_atomically(
        path, lambda temporary: safetensors.torch.save_model(model, str(temporary), metadata)
    )
    path.chmod(0o644)  # safetensors writes 0600; the folder is deployed, read by other users
    return path


def write_model_manifest(manifest: ModelManifest, directory: Path) -> Path:
    """``psearch.json``, written last by an export: a folder with it is complete."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    return write_text_atomically(directory / MODEL_MANIFEST_FILE, text)


def read_model_manifest(model_dir: Path) -> ModelManifest:
    """The manifest of a model folder, validated."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: not a directory (expected an exported model folder)")
    path = model_dir / MODEL_MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{model_dir}: no {MODEL_MANIFEST_FILE}; is it a folder written by psearch-export?"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {data.get('format_version')}, this psearch reads "
            f"{FORMAT_VERSION}; re-export the model with this version"
        )
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as error:
        reason = " ".join(str(error).split())[:500]
        raise ArtifactError(f"{path}: invalid manifest: {reason}") from None


def load_model(model_dir: Path, manifest: ModelManifest | None = None) -> nn.Module:
    """The PyTorch model of a model folder, in eval mode on CPU, checked against the
    fingerprint of its manifest."""
    model_dir = Path(model_dir)
    manifest = manifest or read_model_manifest(model_dir)
    model = _build_checked(manifest.config, str(model_dir / MODEL_MANIFEST_FILE))
    _load_weights(model, model_dir / manifest.weights)
    actual = fingerprint(model.state_dict(), manifest.config)
    if actual != manifest.fingerprint:
        raise ArtifactError(
            f"{model_dir}: the weights and config do not match the manifest's fingerprint "
            f"({actual[:19]}... vs {manifest.fingerprint[:19]}...); the folder was modified"
        )
    return model.eval()
