"""What the API takes and returns. Every field is described: these models are the OpenAPI docs.

Requests that carry images are multipart forms; a bulk job request is JSON. A box travels in a
form as one text field ``x1,y1,x2,y2`` (pixels of the uploaded image, x right, y down); in JSON
answers it is a list of four numbers.
"""

import os
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from indexer.validation import MAX_NAME_LENGTH, check_camera, check_name

# Hard bound of top_k in the schema; the configured top_k_max (at most this) is checked too.
TOP_K_LIMIT = 10_000

# The gallery's rule for names (indexer.validation.check_name), its length bounds also in the
# OpenAPI document.
CameraName = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(check_camera)
]
JobName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_LENGTH),
    AfterValidator(lambda name: check_name(name, "a job name")),
]

BoxOut = Annotated[
    list[float],
    Field(
        min_length=4,
        max_length=4,
        description="x1, y1, x2, y2 in pixels of the (upright) image, x right, y down.",
    ),
]


def _parse_box(value: object) -> object:
    """``"x1,y1,x2,y2"`` (brackets and spaces allowed) as four numbers; pydantic checks them.
    A form delivers the field as a list of its values: one text, or (repeated field) four."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        return value
    parts = [part.strip() for part in value.strip().strip("[]()").split(",")]
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"a box is four comma-separated numbers x1,y1,x2,y2, got {value!r}")
    return parts


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
BoxField = Annotated[
    list[FiniteFloat],
    BeforeValidator(_parse_box),
    Field(min_length=4, max_length=4),
]


class _Form(BaseModel):
    # A misspelt field (topk=5) is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class SearchForm(_Form):
    """``POST /v1/search``: a query person and what to search for."""

    image: UploadFile = Field(
        description="The query: a crop of one person, or a scene image with `box` (JPEG, PNG, "
        "WebP, BMP, TIFF or GIF)."
    )
    box: BoxField | None = Field(
        default=None,
        description="The query person in `image` as `x1,y1,x2,y2` pixels; omitted: the whole "
        "image is the person crop.",
    )
    top_k: int = Field(
        default=10,
        ge=1,
        le=TOP_K_LIMIT,
        description="How many hits to return at most (the service caps it at its top_k_max).",
    )
    min_similarity: FiniteFloat | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Leave out hits less similar than this (cosine similarity, -1 to 1).",
    )
    cameras: list[CameraName] = Field(
        default_factory=list,
        description="Only hits in images of these cameras (repeat the field for several).",
    )
    since: FiniteFloat | None = Field(
        default=None, description="Only hits in images taken at or after this (POSIX seconds)."
    )
    until: FiniteFloat | None = Field(
        default=None, description="Only hits in images taken at or before this (POSIX seconds)."
    )
    exclude_images: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Leave out hits in these gallery images (repeat the field for several).",
    )

    @field_validator("box")
    @classmethod
    def _box_not_inverted(cls, box: list[float] | None) -> list[float] | None:
        if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
            raise ValueError(f"{box} must have x2 > x1 and y2 > y1")
        return box

    @model_validator(mode="after")
    def _time_range_in_order(self) -> "SearchForm":
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"since ({self.since}) is after until ({self.until})")
        return self


class AddImagesForm(_Form):
    """``POST /v1/gallery/images``: images to detect persons in and store."""

    images: list[UploadFile] = Field(
        min_length=1, description="Scene images to index (repeat the field for several)."
    )
    cameras: list[CameraName] = Field(
        default_factory=list,
        description="The camera of the images: none, one for all, or one per image in order "
        f"(1 to {MAX_NAME_LENGTH} characters, no control characters).",
    )
    timestamps: list[FiniteFloat] = Field(
        default_factory=list,
        description="When the images were taken (POSIX seconds): none, one for all, or one "
        "per image in order.",
    )


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="A stable machine-readable code, e.g. `bad_image`.")
    message: str = Field(description="What is wrong, for a person to read.")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail = Field(description="The error.")


class QueryInfo(BaseModel):
    """The query person as the service embedded it."""

    box: BoxOut = Field(description="The box whose embedding was searched for.")
    method: Literal["box", "max_iou_detection"] = Field(
        description="`box`: the model embedded the requested box itself; `max_iou_detection`: "
        "the model (one that cannot embed a given box) detected the persons of the query image "
        "and the one overlapping the requested box most was used."
    )
    requested_box: BoxOut = Field(
        description="The box asked for: `box`, or the whole image when none was given."
    )
    iou: float = Field(
        description="IoU of `box` with `requested_box`; low values (below 0.5) mean the "
        "detector found no good match for the requested person."
    )
    det_score: float | None = Field(
        description="Detection score of `box` (for `max_iou_detection`; otherwise null)."
    )
    width: int = Field(description="Width of the uploaded image (after EXIF rotation).")
    height: int = Field(description="Height of the uploaded image (after EXIF rotation).")


class SearchHit(BaseModel):
    """A gallery person similar to the query."""

    person_id: int = Field(description="Id of the detected person.")
    image_id: int = Field(description="Id of the gallery image the person is in.")
    uri: str | None = Field(description="Where the gallery image came from (file name or path).")
    camera: str | None = Field(description="Camera of the gallery image, if known.")
    timestamp: float | None = Field(description="When the image was taken (POSIX seconds).")
    box: BoxOut = Field(description="The person in the gallery image, in its pixels.")
    similarity: float = Field(description="Cosine similarity to the query, -1 to 1.")
    det_score: float = Field(description="Detection score of the person, 0 to 1.")


class SearchTimings(BaseModel):
    """Where the time of a search went, in milliseconds."""

    decode_ms: float = Field(description="Decoding the uploaded image.")
    embed_ms: float = Field(description="Embedding the query, waiting for the batcher included.")
    search_ms: float = Field(description="Searching the gallery.")
    total_ms: float = Field(description="The whole request, as the service saw it.")


class SearchResponse(BaseModel):
    """Ranked matches of the query person, best first."""

    query: QueryInfo = Field(description="The query as embedded.")
    hits: list[SearchHit] = Field(description="The most similar gallery persons, best first.")
    timings: SearchTimings = Field(description="Where the time went.")


class AddedImage(BaseModel):
    """The outcome for one uploaded image."""

    filename: str | None = Field(description="The upload's file name, as the client sent it.")
    image_id: int = Field(description="Id of the image in the gallery.")
    sha256: str = Field(description="SHA-256 of the uploaded bytes (the gallery's key).")
    added: bool = Field(
        description="False when the same bytes were already in the gallery (nothing changed)."
    )
    num_persons: int = Field(description="Persons stored for the image.")
    width: int = Field(description="Image width (after EXIF rotation).")
    height: int = Field(description="Image height (after EXIF rotation).")


class AddImagesTimings(BaseModel):
    """Where the time of an upload went, in milliseconds."""

    decode_ms: float = Field(description="Decoding the images.")
    detect_ms: float = Field(description="Detecting persons, waiting for the batcher included.")
    store_ms: float = Field(description="Writing files and the gallery transaction.")
    total_ms: float = Field(description="The whole request, as the service saw it.")


class AddImagesResponse(BaseModel):
    """The uploaded images, in upload order; all stored in one transaction."""

    images: list[AddedImage] = Field(description="One entry per uploaded image, in order.")
    timings: AddImagesTimings = Field(description="Where the time went.")


class PersonOut(BaseModel):
    """A person detected in a gallery image."""

    id: int = Field(description="Id of the person.")
    box: BoxOut = Field(description="The person in the image, in its pixels.")
    det_score: float = Field(description="Detection score, 0 to 1.")


class ImageOut(BaseModel):
    """A gallery image (its metadata; the pixels are at `/v1/gallery/images/{id}/file`)."""

    id: int = Field(description="Id of the image.")
    uri: str | None = Field(description="Where the image came from (file name or path).")
    sha256: str = Field(description="SHA-256 of the image file.")
    camera: str | None = Field(description="Camera of the image, if known.")
    timestamp: float | None = Field(description="When the image was taken (POSIX seconds).")
    width: int = Field(description="Image width in pixels.")
    height: int = Field(description="Image height in pixels.")
    added_at: float = Field(description="When the image was added (POSIX seconds).")
    persons: list[PersonOut] = Field(description="The persons stored for the image.")


class RemovedImage(BaseModel):
    """What removing an image did."""

    image_id: int = Field(description="Id of the removed image.")
    num_persons: int = Field(description="Persons removed with it.")


class GalleryStatsOut(BaseModel):
    """Counts and settings of the gallery."""

    num_images: int = Field(description="Images in the gallery.")
    num_persons: int = Field(description="Persons in the gallery.")
    indexed: int = Field(description="Persons in the vector index (equals num_persons).")
    pending: int = Field(description="Persons added since the index was last written to disk.")
    dim: int = Field(description="Embedding dimension.")
    metric: str = Field(description="Similarity of the index (inner product of unit vectors).")
    index_type: str = Field(description="Vector index type: flat, ivf_flat, ivf_pq or hnsw.")
    fingerprint: str = Field(description="Fingerprint of the model the gallery belongs to.")


class ModelOut(BaseModel):
    """The loaded model."""

    name: str = Field(description="Model (method) name.")
    fingerprint: str = Field(description="Hash of the weights and config.")
    dim: int = Field(description="Embedding dimension.")
    backend: str = Field(description="Inference backend in use.")
    device: str = Field(description="Inference device in use.")
    detection_threshold: float | None = Field(
        description="The detection threshold the model folder recommends (null: it names none)."
    )


class HealthOut(BaseModel):
    """The process is alive."""

    status: Literal["ok"] = Field(description="Always `ok`.")


class ReadyOut(BaseModel):
    """The service is ready: model and gallery are loaded."""

    status: Literal["ready"] = Field(description="Always `ready` (otherwise the answer is 503).")
    model: ModelOut = Field(description="The loaded model.")
    min_detection_score: float = Field(
        description="Persons detected with a lower score are not stored: the "
        "min_detection_score setting, or else the model's recommended detection_threshold."
    )
    gallery: GalleryStatsOut = Field(description="The loaded gallery.")


def _server_path(path: str) -> str:
    """An absolute path, as the server's file system spells it (no NUL, which no path holds)."""
    if "\x00" in path:
        raise ValueError(f"a path cannot contain a NUL character, got {path!r}")
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is relative; give the absolute path on the server")
    return path


ServerPath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_server_path)]
MAX_JOB_PATHS = 1000


class JobRequest(BaseModel):
    """``POST /v1/gallery/jobs``: server files and folders to index, under the allowed roots."""

    model_config = ConfigDict(extra="forbid")

    paths: list[ServerPath] = Field(
        default_factory=list,
        max_length=MAX_JOB_PATHS,
        description="Absolute paths of image files, or of folders whose image files are indexed "
        "(in name order).",
    )
    manifest: ServerPath | None = Field(
        default=None,
        description="Absolute path of a manifest (CSV with a `path` column, or JSON lines) "
        "listing images with their camera and capture time; relative entries are relative to "
        "its folder.",
    )
    recursive: bool = Field(default=False, description="Also index the subfolders of `paths`.")
    camera: CameraName | None = Field(
        default=None, description="Camera of every image whose manifest row names none."
    )
    name: JobName | None = Field(
        default=None, description="A name for the job, unique in the gallery."
    )

    @model_validator(mode="after")
    def _something_to_index(self) -> "JobRequest":
        if not self.paths and self.manifest is None:
            raise ValueError("give `paths`, a `manifest`, or both")
        return self


JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class JobFailureOut(BaseModel):
    """An image a job could not add."""

    path: str = Field(description="The image file (symlinks resolved).")
    reason: str = Field(description="Why it was not added.")


class JobSummaryOut(BaseModel):
    """A bulk indexing job, in short."""

    id: int = Field(description="Id of the job.")
    name: str | None = Field(description="Its name, if it was given one.")
    status: JobStatus = Field(
        description="`queued` (waiting for the worker, or interrupted by a shutdown: it resumes "
        "when the service starts again), `running`, `done` (every image attempted; some may "
        "have failed), `failed` (stopped by an error that is not one image's: see `error`), "
        "`cancelled` (stopped on purpose: cancelled through the API, or Ctrl-C of "
        "`psearch-index`; not resumed)."
    )
    error: str | None = Field(description="Why the job failed, was cancelled or interrupted.")
    total: int = Field(description="Images the job lists.")
    done: int = Field(description="Images with an outcome: added, duplicate or failed.")
    created_at: float = Field(description="When the job was submitted (POSIX seconds).")
    updated_at: float = Field(description="When its status or counts last changed.")


class JobOut(JobSummaryOut):
    """A bulk indexing job and its progress."""

    added: int = Field(description="Images added to the gallery.")
    duplicates: int = Field(description="Images whose bytes were in the gallery already.")
    failed: int = Field(description="Images that could not be added (`failures` says why).")
    failures: list[JobFailureOut] = Field(
        description="The first failed images, in job order, with the reason."
    )


class JobListOut(BaseModel):
    """The gallery's bulk indexing jobs."""

    jobs: list[JobSummaryOut] = Field(description="Every job, newest first.")


_ERROR_DESCRIPTIONS = {
    400: "The image is empty or cannot be decoded, or the body cannot be parsed.",
    401: "An API key is required (X-API-Key header).",
    403: "The API key is not valid.",
    404: "No such image.",
    409: "The gallery was built with another model than the one loaded.",
    413: "The body, an image's pixel count or the number of images is over the limits.",
    415: "The body is not multipart/form-data, or a file is not an image type the service reads.",
    422: "A field is invalid (the message names it).",
    503: "Overloaded (retry after Retry-After seconds) or not ready.",
}


def described_error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry of one error status with an operation's own wording."""
    return {status: {"model": ErrorResponse, "description": description}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of these error statuses, all in the :class:`ErrorResponse` shape."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }
