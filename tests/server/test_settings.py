"""Settings: defaults, a YAML or JSON file, PSEARCH_* variables, arguments, in that precedence."""

import json
import os

import pytest
from pydantic import ValidationError

from server.settings import ServerSettings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No PSEARCH_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith("PSEARCH_"):
            monkeypatch.delenv(name)


def test_arguments_beat_the_environment_which_beats_the_file(tmp_path, monkeypatch):
    config = tmp_path / "server.yaml"
    config.write_text("max_batch_size: 4\nqueue_size: 10\nmax_images_per_request: 8\nport: 1001\n")
    monkeypatch.setenv("PSEARCH_QUEUE_SIZE", "20")
    monkeypatch.setenv("PSEARCH_PORT", "1002")

    settings = load_settings(config, port=1003)

    assert (settings.max_batch_size, settings.queue_size, settings.port) == (4, 20, 1003)


def test_a_json_file_is_read_too(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"gallery_dir": "/data/gallery", "top_k_max": 7}))
    settings = load_settings(config)
    assert (str(settings.gallery_dir), settings.top_k_max) == ("/data/gallery", 7)


def test_lists_come_from_the_environment_as_json_or_comma_separated(monkeypatch):
    monkeypatch.setenv("PSEARCH_API_KEYS", "first, second")
    monkeypatch.setenv("PSEARCH_ALLOWED_ROOTS", '["/data/a", "/data/b"]')
    settings = load_settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["first", "second"]
    assert [str(root) for root in settings.allowed_roots] == ["/data/a", "/data/b"]


def test_api_keys_do_not_show_in_the_settings_repr():
    assert "hunter2" not in repr(ServerSettings(api_keys=["hunter2"]))


def test_an_upload_limit_the_queue_could_never_take_is_refused_naming_both():
    """An upload submits all its images to the inference queue at once: with more images per
    request than the queue holds, such an upload could never succeed (it was 503 forever)."""
    with pytest.raises(
        ValidationError, match=r"max_images_per_request \(3\) is more than queue_size \(2\)"
    ):
        ServerSettings(queue_size=2, max_images_per_request=3)
    assert ServerSettings(queue_size=2, max_images_per_request=2).queue_size == 2
    defaults = ServerSettings()
    assert defaults.max_images_per_request <= defaults.queue_size


def test_the_detection_floor_defaults_to_the_model_folders_threshold():
    """None: the service takes the model folder's recommended threshold (tests/server/
    test_detection_threshold.py); a setting overrides it."""
    assert ServerSettings().min_detection_score is None
    assert ServerSettings(min_detection_score=0.3).min_detection_score == 0.3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_sise: 4\n", "max_batch_sise"),  # a typo is an error, not ignored
        ("max_batch_size: 0\n", "greater than or equal to 1"),
        ("backend: tensorflow\n", "backend"),
        ("api_keys: ['']\n", "must not be empty"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(tmp_path, text, message):
    config = tmp_path / "server.yaml"
    config.write_text(text)
    with pytest.raises(ValidationError, match=message):
        load_settings(config)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(config)
