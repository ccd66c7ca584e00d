"""The one way in for an image: encoded bytes to the (H, W, 3) RGB uint8 pixels the engine takes.

Uploads, bulk jobs, ``psearch-index add`` and the Ray ingest all decode with
:func:`decode_image`, so one image gives the same pixels, and so the same persons, whichever way
it comes in. Every encoding Pillow reads is decoded the way a person looks at it:

- EXIF orientation applied (a photo is seen upright, as it was taken);
- greyscale and palette expanded to RGB, 16-bit samples scaled to 8 bits (Pillow would clip
  them), CMYK converted;
- transparency composited onto white (what a viewer shows behind a cut-out);
- an animated image gives its first frame.

The pixel limit is checked from the header, before a pixel is decoded: a 1 kB PNG may claim
100 000 x 100 000 pixels (a decompression bomb) and is refused unopened. Files are read with a
byte limit (:data:`DEFAULT_MAX_IMAGE_BYTES`) before they get here (``common.reading``).
:data:`FORMATS` is the list of formats read, with the media type each is served as
(:func:`image_media_type`); :data:`IMAGE_SUFFIXES` are the file names a folder listing picks up.

Training decodes its dataset frames itself (``training/data.py``): the datasets' boxes are in
the stored pixel grid, so their frames must not be turned by EXIF orientation.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's format names of what we read, and the media type each is served as.
FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a JPEG with more pictures after it (phone cameras); the first is read
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
    "PPM": "image/x-portable-anymap",  # PPM and PGM
}
# What a folder listing picks up (a file named explicitly is taken whatever its name).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)
# Media types a client may declare for an image: the formats' own and their common aliases.
IMAGE_MEDIA_TYPES = frozenset(FORMATS.values()) | {
    "image/x-portable-pixmap",
    "image/x-portable-graymap",
}
# Clients that do not know the type send these; the bytes then say what the image is.
GENERIC_MEDIA_TYPES = frozenset({"application/octet-stream", ""})

DEFAULT_MAX_PIXELS = 40_000_000
# An image file larger than this is refused unread: a 40-megapixel photo is a few tens of MB
# (as a PNG up to about 120), and reading a larger file only to fail to decode it costs as much
# memory as the file.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BACKGROUND = (255, 255, 255)  # behind transparent pixels


class ImageError(ValueError):
    """An image that cannot be taken; the message says why."""


class UnreadableImage(ImageError):
    """Empty bytes, bytes that are not an image, or a truncated or corrupt image."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit (or than Pillow will ever open)."""


class UnsupportedImage(ImageError):
    """An image in a format, or with a pixel type, that we do not read."""


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the image"
) -> np.ndarray:
    """(H, W, 3) RGB uint8 pixels of encoded image bytes, upright, refusing images of more than
    ``max_pixels`` pixels (width x height). ``what`` names the image in messages.

    Raises :class:`UnreadableImage`, :class:`ImageTooLarge` or :class:`UnsupportedImage`.
    """
    if not data:
        raise UnreadableImage(f"{what} is empty (0 bytes)")
    image = _open(data, what)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{what} is {width} x {height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        image.load()
        pixels = _to_rgb(ImageOps.exif_transpose(image), what)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(
            f"{what} is corrupt or truncated ({image.format} could not be decoded: {error})"
        ) from None
    return np.ascontiguousarray(pixels)


def is_image_media_type(media_type: str | None) -> bool:
    """Whether a declared media type (``image/png; q=1``) may be an image we read: one of ours,
    or none or a generic one (then the bytes decide)."""
    declared = (media_type or "").split(";")[0].strip().lower()
    return declared in GENERIC_MEDIA_TYPES or declared in IMAGE_MEDIA_TYPES


def image_media_type(image: bytes | Path) -> str:
    """The media type an image (its bytes, or a file) is served as, from its header (of the
    :data:`FORMATS` read); ``application/octet-stream`` for anything else."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            image_format = opened.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "application/octet-stream"
    return FORMATS.get(image_format or "", "application/octet-stream")


def _open(data: bytes, what: str) -> Image.Image:
    """Read the header only (Pillow opens lazily) and check the format."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning below its hard limit would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"{what} claims too many pixels: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UnreadableImage(
            f"{what} is not an image (or one in a format Pillow cannot read)"
        ) from None
    if image.format not in FORMATS:
        raise UnsupportedImage(
            f"{what} is a {image.format} image; the formats read are {', '.join(sorted(FORMATS))}"
        )
    return image


def _to_rgb(image: Image.Image, what: str) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded, upright image of any mode Pillow decodes."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_to_eight_bits(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise UnsupportedImage(
            f"{what} has floating-point pixels, whose range is unknown; use 8 or 16-bit images"
        )
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        return _composite(image.convert("RGBA"))
    return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy warns otherwise


def _sixteen_to_eight_bits(samples: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255, rounding: v * 255 / 65535 = v / 257."""
    wide = np.clip(samples.astype(np.int64), 0, 65535)
    return ((wide + 128) // 257).astype(np.uint8)


def _composite(rgba: Image.Image) -> np.ndarray:
    """RGB of an RGBA image seen over the white background (alpha blending, rounded)."""
    values = np.asarray(rgba).astype(np.float32)
    alpha = values[:, :, 3:] / 255.0
    blended = values[:, :, :3] * alpha + np.asarray(_BACKGROUND, np.float32) * (1 - alpha)
    return np.rint(blended).astype(np.uint8)
