"""The service's settings: a YAML or JSON file, ``PSEARCH_*`` environment variables, arguments.

Precedence, highest first: explicit arguments (command-line flags), environment variables
(``PSEARCH_MODEL_DIR=/models/alignps``; lists as JSON or comma-separated:
``PSEARCH_API_KEYS=key1,key2``), the settings file, the defaults. Unknown keys are errors.
"""

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from common.config_files import read_yaml_mapping
from export.runtime import Backend, Device
from indexer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from indexer.types import DEFAULT_MIN_SCORE

ENV_PREFIX = "PSEARCH_"


class ServerSettings(BaseSettings):
    """Everything the service can be told. Every field has a default and a description."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model_dir: Path = Field(
        default=Path("model"), description="An exported model folder (psearch.json inside)."
    )
    gallery_dir: Path = Field(default=Path("gallery"), description="The gallery folder.")
    create_gallery: bool = Field(
        default=True,
        description="Create an empty gallery for the model when gallery_dir holds none.",
    )
    backend: Backend = Field(
        default="auto", description="Inference backend; 'auto' picks the fastest available."
    )
    device: Device = Field(default="cpu", description="Inference device.")
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads of the backend (default: its own choice)."
    )
    min_detection_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Detections in gallery images (uploaded or indexed by jobs) scored lower "
        "than this are not stored. Default: the threshold the model folder recommends "
        f"(detection_threshold in psearch.json), or {DEFAULT_MIN_SCORE} for a folder without one.",
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Most images the engine runs in one forward pass."
    )
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="An optional extra wait: how long a request may wait for others to fill "
        "its batch. 0 (the default): a request that finds the engine idle runs at once, and "
        "those arriving while it runs form the next batch; raise it where a batch costs little "
        "more than one image (GPUs) and latency may grow by that much.",
    )
    queue_size: int = Field(
        default=64,
        ge=1,
        description="Images that may wait for the engine; beyond, requests get 503. At least "
        "max_images_per_request (an upload sends all its images at once).",
    )
    retry_after_s: int = Field(
        default=1,
        ge=1,
        description="Retry-After (seconds) sent with 503 answers (overloaded, not ready).",
    )
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, all files and form fields together.",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES,
        ge=1,
        description="Largest image file accepted, uploaded or read by a job (bytes; a job's "
        "larger file is refused without reading it).",
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest image accepted, uploaded or indexed by a job (width x height, read "
        "from the file header before decoding: decompression bombs are refused unopened).",
    )
    max_images_per_request: int = Field(
        default=32,
        ge=1,
        description="Most images one POST /v1/gallery/images may carry; at most queue_size.",
    )
    top_k_max: int = Field(default=100, ge=1, description="Largest top_k a search may ask for.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted in the X-API-Key header; empty: no authentication.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Server folders whose images jobs may index, and whose indexed images the "
        "file endpoint serves (the web page's pictures of the matches).",
    )
    host: str = Field(default="127.0.0.1", description="Address psearch-serve listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port psearch-serve listens on.")

    @field_validator("api_keys", "allowed_roots", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Environment variables hold lists as JSON or as comma-separated values."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value() for key in keys):
            raise ValueError("API keys must not be empty strings")
        return keys

    @model_validator(mode="after")
    def _uploads_fit_the_queue(self) -> "ServerSettings":
        """An upload submits all its images to the inference queue at once: a request of more
        images than the queue holds could never be accepted."""
        if self.max_images_per_request > self.queue_size:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) is more than "
                f"queue_size ({self.queue_size}): an upload of that many images would never "
                "fit in the inference queue; lower max_images_per_request or raise queue_size"
            )
        return self


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings from ``overrides``, then ``PSEARCH_*`` variables, then ``config_file`` (YAML or
    JSON, a mapping of field names), then the defaults. A settings file that cannot be read is a
    :class:`~common.config_files.ConfigFileError` (a ValueError) naming it."""
    file_values = read_yaml_mapping(config_file, "settings file") if config_file else {}
    environment = EnvSettingsSource(ServerSettings)()
    return ServerSettings(**{**file_values, **environment, **overrides})
