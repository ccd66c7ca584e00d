"""docker/prepare_model.py: the model folder the containers serve, with its TensorRT engine
built into a writable mirror of the read-only model folder.

TensorRT and a GPU are not here: the engine step of the export package is replaced by a stand-in
that writes an engine file where it is told to, as ``export.tensorrt.ensure_engine`` does.
"""

import importlib.util
from pathlib import Path

import pytest

from export.artifact import ArtifactError, ModelManifest, write_model_manifest
from export.cli import UsageError
from models.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = "sha256:" + "0123456789abcdef" * 4
ENGINE = "model.sm90-trt10.16.1.11.engine"


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_model", REPO / "docker/prepare_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_model = load_script()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model folder as psearch-export leaves it (the graphs' bytes do not matter here)."""
    folder = tmp_path / "models" / "alignps"
    folder.mkdir(parents=True)
    manifest = ModelManifest(
        psearch_version="0.1.0",
        name="alignps",
        config={},
        preprocess=PreprocessConfig(),
        embedding_dim=8,
        embeds_boxes=False,
        fingerprint=FINGERPRINT,
    )
    write_model_manifest(manifest, folder)
    for name in ("model.onnx", "model.plugins.onnx", "checkpoint.safetensors"):
        (folder / name).write_bytes(name.encode())
    return folder


@pytest.fixture
def fake_tensorrt(monkeypatch) -> list[Path]:
    """TensorRT "available", and an engine step that records the folder it built in."""
    built_in: list[Path] = []

    def build(folder: Path, manifest: ModelManifest) -> dict[str, Path]:
        built_in.append(folder)
        (folder / ENGINE).write_bytes(b"engine of " + manifest.fingerprint.encode())
        return {"detect": folder / ENGINE}

    monkeypatch.setattr(prepare_model, "check_tensorrt_available", lambda: None)
    monkeypatch.setattr(prepare_model, "ensure_tensorrt_engines", build)
    return built_in


def listing(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cache_folder_is_named_after_the_model_and_16_hex_digits_of_its_fingerprint():
    assert prepare_model.cache_folder_name("alignps", FINGERPRINT) == "alignps-0123456789abcdef"
    # Characters a folder name should not carry become dashes.
    assert prepare_model.cache_folder_name("leaps/r50 v2", FINGERPRINT) == (
        "leaps-r50-v2-0123456789abcdef"
    )


@pytest.mark.parametrize("fingerprint", ["", "sha256:0123", "md5:" + "0" * 32, "sha256:XYZ" * 8])
def test_cache_folder_refuses_a_fingerprint_that_is_not_a_sha256_digest(fingerprint):
    with pytest.raises(ValueError, match="sha256"):
        prepare_model.cache_folder_name("alignps", fingerprint)


def test_mirror_links_every_file_and_leaves_the_model_folder_alone(model_dir, tmp_path):
    before = listing(model_dir)
    mirror = prepare_model.mirror_model_dir(model_dir, tmp_path / "cache" / "m")
    assert listing(mirror) == before  # the same names and bytes, read through the links
    assert all((mirror / name).is_symlink() for name in before)
    assert (mirror / "model.onnx").resolve() == (model_dir / "model.onnx").resolve()
    assert listing(model_dir) == before


def test_mirror_keeps_files_written_in_it_and_follows_the_model_folder(model_dir, tmp_path):
    mirror = prepare_model.mirror_model_dir(model_dir, tmp_path / "cache" / "m")
    (mirror / ENGINE).write_bytes(b"built here")
    (model_dir / "checkpoint.safetensors").unlink()
    (model_dir / "embed.onnx").write_bytes(b"new graph")
    (model_dir / ENGINE).write_bytes(b"shipped with the model")

    prepare_model.mirror_model_dir(model_dir, mirror)

    assert (mirror / ENGINE).read_bytes() == b"built here"  # a real file wins over a link
    assert (mirror / "embed.onnx").read_bytes() == b"new graph"
    assert not (mirror / "checkpoint.safetensors").is_symlink()  # its file is gone: link too
    assert not (mirror / "checkpoint.safetensors").exists()


def test_backends_without_engines_serve_the_model_folder_itself(model_dir, tmp_path):
    for backend in ("auto", "torch", "onnxruntime"):
        served = prepare_model.prepare(
            model_dir, backend=backend, device="cuda", cache_dir=tmp_path / "cache"
        )
        assert served == model_dir
    assert not (tmp_path / "cache").exists()


def test_tensorrt_builds_the_engine_in_a_mirror_named_after_the_model(
    model_dir, tmp_path, fake_tensorrt
):
    before = listing(model_dir)
    served = prepare_model.prepare(
        model_dir, backend="tensorrt", device="cuda", cache_dir=tmp_path / "cache"
    )
    assert served == tmp_path / "cache" / "alignps-0123456789abcdef"
    assert fake_tensorrt == [served]
    assert listing(served) == {**before, ENGINE: b"engine of " + FINGERPRINT.encode()}
    assert listing(model_dir) == before  # the read-only volume is never written


def test_a_restart_prepares_the_same_mirror_again(model_dir, tmp_path, fake_tensorrt):
    cache = tmp_path / "cache"
    first = prepare_model.prepare(model_dir, backend="tensorrt", device="cuda", cache_dir=cache)
    second = prepare_model.prepare(model_dir, backend="tensorrt", device="cuda", cache_dir=cache)
    # The engine step runs each time: it decides itself whether the cached engine still fits.
    assert first == second and fake_tensorrt == [first, first]
    assert [path.name for path in cache.iterdir()] == [first.name]


def test_tensorrt_on_cpu_is_refused_before_anything_is_built(model_dir, tmp_path, fake_tensorrt):
    with pytest.raises(UsageError, match="PSEARCH_DEVICE=cuda"):
        prepare_model.prepare(model_dir, backend="tensorrt", device="cpu", cache_dir=tmp_path)
    assert fake_tensorrt == []


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"no psearch\.json"):
        prepare_model.prepare(tmp_path, backend="onnxruntime", device="cpu", cache_dir=tmp_path)


def test_main_prints_the_folder_to_serve(model_dir, tmp_path, fake_tensorrt, capsys):
    arguments = ["--model-dir", str(model_dir), "--backend", "tensorrt", "--device", "cuda"]
    status = prepare_model.main([*arguments, "--cache-dir", str(tmp_path / "cache")])
    assert status == 0
    assert capsys.readouterr().out == f"{tmp_path / 'cache' / 'alignps-0123456789abcdef'}\n"


def test_main_explains_a_missing_model_in_one_line_and_exits_2(tmp_path, capsys):
    arguments = ["--model-dir", str(tmp_path / "nothing"), "--backend", "auto", "--device", "cpu"]
    status = prepare_model.main([*arguments, "--cache-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.startswith("prepare-model: error: ")
    assert "not a directory" in captured.err and captured.err.count("\n") == 1
