"""Uploaded files: read from the request, decoded by the indexer's one decoder, its refusals
answered with the service's errors (400 unreadable, 413 too many bytes or pixels, 415 not an
image type we read)."""

from dataclasses import dataclass

import numpy as np
from fastapi import UploadFile

from indexer.images import (
    IMAGE_MEDIA_TYPES,
    ImageTooLarge,
    UnreadableImage,
    UnsupportedImage,
    decode_image,
    is_image_media_type,
)
from server.errors import BadImage, TooLarge, UnsupportedMediaType


@dataclass(frozen=True)
class Upload:
    """An uploaded file as read from the request."""

    data: bytes
    filename: str | None
    media_type: str | None


async def read_upload(file: UploadFile) -> Upload:
    """The bytes, file name and declared media type of an uploaded file."""
    return Upload(await file.read(), file.filename, file.content_type)


def decode_upload(upload: Upload, max_pixels: int, max_bytes: int, what: str) -> np.ndarray:
    """The (H, W, 3) RGB uint8 pixels of an uploaded image (``indexer.images.decode_image``),
    or the service's error; ``what`` names the image in messages. An image file is at most
    ``max_bytes``, as jobs read them."""
    if len(upload.data) > max_bytes:
        raise TooLarge(f"{what} is {len(upload.data)} bytes; the limit is {max_bytes}")
    if not is_image_media_type(upload.media_type):
        declared = (upload.media_type or "").split(";")[0].strip().lower()
        raise UnsupportedMediaType(
            f"{what} has media type {declared!r}; supported: {', '.join(sorted(IMAGE_MEDIA_TYPES))}"
        )
    try:
        return decode_image(upload.data, max_pixels, what)
    except UnreadableImage as error:
        raise BadImage(str(error)) from None
    except ImageTooLarge as error:
        raise TooLarge(str(error)) from None
    except UnsupportedImage as error:
        raise UnsupportedMediaType(str(error)) from None


def image_size(pixels: np.ndarray) -> tuple[int, int]:
    """(width, height) of (H, W, 3) pixels."""
    return int(pixels.shape[1]), int(pixels.shape[0])
