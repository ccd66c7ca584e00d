"""The one decoder of every route: every encoding to RGB uint8 as a viewer shows it, the pixel
limit before decoding, one list of formats."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from indexer.images import (
    ImageTooLarge,
    UnreadableImage,
    UnsupportedImage,
    decode_image,
    is_image_media_type,
)

LIMIT = 1_000_000


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit RGB pixels, with a tiny (wrong) IDAT: what a
    decompression bomb looks like to a decoder that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_rgb_png_decodes_to_the_same_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pixels = decode_image(encode(Image.fromarray(pixels), "PNG"), LIMIT)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (5, 7, 3)
    np.testing.assert_array_equal(pixels, pixels)


def test_exif_orientation_is_applied():
    """Orientation 6 means "rotate 90 degrees clockwise to view": a 4 wide x 2 high stored image
    whose top-left pixel is red is viewed 2 wide x 4 high, with red at the top-right."""
    stored = np.zeros((2, 4, 3), dtype=np.uint8)
    stored[0, 0] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation
    pixels = decode_image(encode(image, "PNG", exif=exif), LIMIT)
    assert pixels.shape == (4, 2, 3)
    np.testing.assert_array_equal(pixels[0, 1], (255, 0, 0))
    np.testing.assert_array_equal(pixels[0, 0], (0, 0, 0))


def test_greyscale_is_repeated_on_three_channels():
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    pixels = decode_image(encode(Image.fromarray(grey, mode="L"), "PNG"), LIMIT)
    np.testing.assert_array_equal(pixels, np.repeat(grey[:, :, None], 3, axis=2))


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    """PIL's own conversion clips 16-bit values to 255; we scale: v / 257, rounded, so 65535 ->
    255, 32896 (= 128 * 257) -> 128, 300 -> 1 (300 / 257 = 1.17), 0 -> 0."""
    samples = np.array([[0, 300], [32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(samples)  # mode I;16
    pixels = decode_image(encode(image, "PNG"), LIMIT)
    expected = np.array([[0, 1], [128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(pixels[:, :, 0], expected)
    np.testing.assert_array_equal(pixels[:, :, 2], expected)


def test_alpha_is_composited_onto_white():
    """Opaque pixels keep their colour, transparent ones are white, half-transparent black
    (alpha 128) is 255 * (1 - 128/255) = 127 (rounded)."""
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    pixels = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), LIMIT)
    np.testing.assert_array_equal(pixels[0], [[10, 20, 30], [255, 255, 255], [127] * 3])


def test_palette_with_transparency_is_composited():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    pixels = decode_image(encode(image, "PNG", transparency=1), LIMIT)
    np.testing.assert_array_equal(pixels[0], [[255, 0, 0], [255, 255, 255]])


def test_cmyk_is_converted_to_rgb():
    """Pure cyan (255, 0, 0, 0) in CMYK is (0, 255, 255) in RGB, pure black K is (0, 0, 0)."""
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    pixels = decode_image(encode(image, "TIFF"), LIMIT)
    np.testing.assert_array_equal(pixels[0], [[0, 255, 255], [0, 0, 0]])


def test_cmyk_jpeg_decodes():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    pixels = decode_image(encode(image, "JPEG", quality=100), LIMIT)
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_allclose(pixels[8, 8], (255, 0, 0), atol=3)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels = decode_image(data, LIMIT)
    np.testing.assert_array_equal(pixels[0, 0], (255, 0, 0))


def test_empty_bytes_are_a_bad_image():
    with pytest.raises(UnreadableImage, match="empty"):
        decode_image(b"", LIMIT)


def test_bytes_that_are_no_image_are_a_bad_image():
    with pytest.raises(UnreadableImage, match="not an image"):
        decode_image(b"%PDF-1.7 hello", LIMIT)


def test_truncated_jpeg_is_a_bad_image():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG")
    with pytest.raises(UnreadableImage, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_a_bomb_header_is_refused_before_decoding():
    """100 000 x 100 000 claimed in 80 bytes: refused from the header, nothing decoded."""
    with pytest.raises(ImageTooLarge):
        decode_image(png_header_only(100_000, 100_000), 40_000_000)


def test_the_pixel_limit_counts_width_times_height():
    """1000 x 1001 = 1 001 000 pixels is over a 1 000 000 limit; 1000 x 1000 is not (and then
    fails as the corrupt image it is)."""
    with pytest.raises(ImageTooLarge, match="1001000 pixels"):
        decode_image(png_header_only(1000, 1001), 1_000_000)
    with pytest.raises(UnreadableImage):
        decode_image(png_header_only(1000, 1000), 1_000_000)


def test_image_formats_we_do_not_read_are_unsupported():
    tga = encode(Image.new("RGB", (2, 2)), "TGA")
    with pytest.raises(UnsupportedImage, match="TGA"):
        decode_image(tga, LIMIT)


@pytest.mark.parametrize("image_format", ["PPM", "WEBP", "BMP", "TIFF"])
def test_the_formats_of_the_folder_listing_are_read(image_format):
    pixels = np.random.default_rng(2).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    options = {"lossless": True} if image_format == "WEBP" else {}
    decoded = decode_image(encode(Image.fromarray(pixels), image_format, **options), LIMIT)
    np.testing.assert_array_equal(decoded, pixels)


def test_a_sixteen_bit_pgm_is_scaled_like_a_sixteen_bit_png():
    samples = np.array([[0, 300, 65535]], dtype=np.uint16)
    pgm = b"P5 3 1 65535\n" + samples.astype(">u2").tobytes()
    np.testing.assert_array_equal(decode_image(pgm, LIMIT)[0, :, 0], [0, 1, 255])


def test_floating_point_images_are_unsupported():
    data = encode(Image.fromarray(np.ones((2, 2), dtype=np.float32), mode="F"), "TIFF")
    with pytest.raises(UnsupportedImage, match="floating-point"):
        decode_image(data, LIMIT)


@pytest.mark.parametrize(
    "media_type",
    [
        "image/jpeg",
        "image/png",
        "IMAGE/PNG; charset=x",
        "image/x-portable-pixmap",
        None,
        "application/octet-stream",
    ],
)
def test_image_and_generic_media_types_are_accepted(media_type):
    assert is_image_media_type(media_type)


@pytest.mark.parametrize("media_type", ["text/plain", "application/pdf", "image/svg+xml"])
def test_other_media_types_are_refused(media_type):
    assert not is_image_media_type(media_type)
