"""Uploaded images to the (H, W, 3) RGB uint8 arrays the engine takes.

Every encoding PIL reads the way a person looks at it: EXIF orientation applied, greyscale and
palette expanded to RGB, 16-bit samples scaled to 8 bits (PIL would clip them), CMYK converted,
transparency composited onto white (what a viewer shows behind a cut-out). Animated images give
their first frame.

Limits are checked from the header, before a pixel is decoded: a 1 kB PNG may claim 100 000 x
100 000 pixels (a decompression bomb) and is refused unopened.
"""

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import BadImage, TooLarge, UnsupportedMediaType

# Container formats PIL identifies that we decode, and the media types uploads may declare.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"})
SUPPORTED_MEDIA_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif"}
)
# Clients that do not know the type send these; the bytes then say what the image is.
GENERIC_MEDIA_TYPES = frozenset({"application/octet-stream", ""})

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_BACKGROUND = (255, 255, 255)  # behind transparent pixels


@dataclass(frozen=True)
class DecodedImage:
    """An image as the engine takes it: ``pixels`` (H, W, 3) RGB uint8, upright."""

    pixels: np.ndarray

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def check_media_type(media_type: str | None, what: str = "the image") -> None:
    """Refuse (415) a declared media type that is not an image type we decode; a missing or
    generic type is accepted (the bytes decide)."""
    declared = (media_type or "").split(";")[0].strip().lower()
    if declared in GENERIC_MEDIA_TYPES or declared in SUPPORTED_MEDIA_TYPES:
        return
    raise UnsupportedMediaType(
        f"{what} has media type {declared!r}; supported: {', '.join(sorted(SUPPORTED_MEDIA_TYPES))}"
    )


def decode_image(data: bytes, max_pixels: int, what: str = "the image") -> DecodedImage:
    """Decode encoded image bytes to RGB uint8, refusing images over ``max_pixels``.

    Raises :class:`BadImage` (empty, not an image, truncated or corrupt),
    :class:`UnsupportedMediaType` (an image format or pixel type we do not read) and
    :class:`TooLarge` (more than ``max_pixels`` pixels). ``what`` names the image in messages.
    """
    if not data:
        raise BadImage(f"{what} is empty (0 bytes)")
    image = _open(data, what)
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(
            f"{what} is {width} x {height} = {width * height} pixels; the limit is {max_pixels}"
        )
    image_format = image.format or ""
    try:
        image.load()
        pixels = _to_rgb(ImageOps.exif_transpose(image), what)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImage(f"{what} could not be decoded ({image_format}): {error}") from error
    return DecodedImage(np.ascontiguousarray(pixels))


def _open(data: bytes, what: str) -> Image.Image:
    """Read the header only (PIL opens lazily) and check the container format."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides; PIL's warning below its hard limit would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise TooLarge(f"{what} claims too many pixels: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"{what} is not an image that can be decoded: {error}") from error
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType(
            f"{what} is a {image.format} image; supported formats: "
            f"{', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    return image


def _to_rgb(image: Image.Image, what: str) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded, upright image of any mode PIL decodes."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_to_eight_bits(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise UnsupportedMediaType(
            f"{what} has floating-point pixels, whose range is unknown; send 8 or 16-bit images"
        )
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
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
