"""psearch-export: the folder it writes, and one-line errors for mistakes a user can fix."""

from __future__ import annotations

import importlib.util

import pytest

from export import cli
from export.artifact import ArtifactError, read_model_manifest
from export.runtime import BackendUnavailableError, ensure_tensorrt_engines


@pytest.mark.parametrize("family", ["alignps", "leaps", "seqnet"])
def test_export_writes_the_model_folder(exported, family):
    """RoI models (with embed_boxes) get the query graphs too."""
    result = exported(family)
    assert result.exit_code == 0, result.printed
    manifest = read_model_manifest(result.model_dir)
    assert manifest.embeds_boxes == hasattr(result.model, "embed_boxes")
    expected = {"psearch.json", "checkpoint.safetensors", "model.onnx", "model.plugins.onnx"}
    if manifest.embeds_boxes:
        expected |= {"embed.onnx", "embed.plugins.onnx"}
    assert {path.name for path in result.model_dir.iterdir()} == expected
    assert f"{family}: fingerprint {manifest.fingerprint}" in result.printed
    assert "parity PASSED" in result.printed


def test_no_tensorrt_engine_is_built_from_graphs_without_image_sizes(exported):
    """What docker/prepare_model.py meets with a folder exported by an older psearch."""
    manifest = read_model_manifest(exported("leaps").model_dir)
    manifest.onnx.inputs = ["images"]
    with pytest.raises(ArtifactError, match="re-export"):
        ensure_tensorrt_engines(exported("leaps").model_dir, manifest)


def test_no_tensorrt_engine_is_built_without_onnx_graphs(exported):
    manifest = read_model_manifest(exported("leaps").model_dir)
    manifest.onnx = None
    with pytest.raises(ArtifactError, match=r"no ONNX graphs.*--format onnx"):
        ensure_tensorrt_engines(exported("leaps").model_dir, manifest)


def test_a_driver_too_old_for_the_plugins_makes_the_backend_unavailable(exported, monkeypatch):
    """What the engine build meets on a GPU node whose driver cannot load the plugins' PTX:
    the runtime's "cannot run here" error (a one-line error in psearch-export and the service),
    not a traceback."""
    import export.runtime as runtime
    import export.tensorrt as tensorrt
    from export.tensorrt.plugins import UnsupportedDriverError

    def too_old(*args, **kwargs):
        raise UnsupportedDriverError("the driver supports CUDA 12.4; the plugins need 12.8")

    # No TensorRT needed: the build settings and the build are stand-ins.
    monkeypatch.setitem(vars(tensorrt), "ensure_engine", too_old)
    monkeypatch.setattr(runtime, "tensorrt_settings", lambda manifest, batch_size: None)
    monkeypatch.setattr(runtime, "tensorrt_embed_settings", lambda manifest: None)
    manifest = read_model_manifest(exported("leaps").model_dir)
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt': the driver supports"):
        ensure_tensorrt_engines(exported("leaps").model_dir, manifest)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
@pytest.mark.parametrize("format_", ["tensorrt", "all"])
def test_tensorrt_format_without_tensorrt_fails_at_once_saying_what_to_install(
    tmp_path, capsys, format_
):
    """Before any work: the checkpoint does not even exist."""
    code, errors = run(
        ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--format", format_],
        capsys,
    )
    assert code == cli.USER_ERROR
    assert len(errors) == 1
    assert "TensorRT is not installed" in errors[0] and "pip install" in errors[0]
    assert not (tmp_path / "m").exists()


def test_a_missing_run_folder_is_a_one_line_error(tmp_path, capsys):
    code, errors = run(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m")], capsys)
    assert code == cli.USER_ERROR
    assert errors == [
        f"psearch-export: error: {tmp_path}: no config.yaml; is it a training run folder?"
    ]


def test_an_existing_model_folder_is_kept_unless_overwrite(exported, capsys):
    result = exported("alignps")
    before = (result.model_dir / "psearch.json").read_text()
    code, errors = run(
        ["--checkpoint", str(result.run_dir), "--out", str(result.model_dir)], capsys
    )
    assert code == cli.USER_ERROR and "add --overwrite" in errors[0]
    assert (result.model_dir / "psearch.json").read_text() == before
