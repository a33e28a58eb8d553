"""Decoding uploads into model arrays and encoding arrays as PNGs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service import imaging
from service.imaging import ImageError, convert_channels, decode_image, grid_png, resize, to_png
from tests.service.helpers import encode, noise, png_header_only, stroke

GREY = (1, 28, 28)
RGB = (3, 28, 28)
LIMIT = 4096 * 4096


def decode(
    data: bytes, shape: tuple[int, int, int] = GREY, strict: bool = False, max_pixels: int = LIMIT
) -> np.ndarray:
    return decode_image(data, shape, max_pixels=max_pixels, strict=strict)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "PPM"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    x = stroke()
    out = decode(encode(x, fmt))
    assert out.shape == GREY and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], x)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_close(fmt: str) -> None:
    x = stroke()
    out = decode(encode(x, fmt))
    assert out.shape == GREY
    assert np.abs(out[0] - x).mean() < 0.05


def test_rgb_upload_becomes_grey_with_pillow_luma() -> None:
    rgb = np.zeros((28, 28, 3), dtype=np.float32)
    rgb[..., 0] = 1.0  # pure red
    out = decode(encode(rgb))
    np.testing.assert_allclose(out, 0.299, atol=1 / 255)


def test_grey_upload_becomes_rgb_for_a_colour_model() -> None:
    out = decode(encode(stroke()), RGB)
    assert out.shape == RGB
    np.testing.assert_array_equal(out[0], out[2])


def test_alpha_and_palette_images_convert() -> None:
    assert decode(encode(stroke(), mode="RGBA")).shape == GREY
    assert decode(encode(stroke(), mode="P")).shape == GREY
    assert decode(encode(stroke(), mode="1")).shape == GREY


def test_sixteen_bit_grey_keeps_its_scale() -> None:
    pixels = np.full((28, 28), 32768, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    np.testing.assert_allclose(decode(buffer.getvalue()), 32768 / 65535, rtol=1e-6)


def test_other_sizes_are_resized() -> None:
    big = np.kron(stroke(), np.ones((2, 2), dtype=np.float32))  # 56x56
    out = decode(encode(big))
    assert out.shape == GREY
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out[0] - stroke()).mean() < 0.05
    assert decode(encode(noise(size=10))).shape == GREY


def test_strict_size_rejects_other_sizes() -> None:
    with pytest.raises(
        ImageError, match="is 56x56; the model takes 28x28 \\(VAE_STRICT_SIZE is on\\)"
    ):
        decode(encode(np.zeros((56, 56))), strict=True)
    assert decode(encode(stroke()), strict=True).shape == GREY


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty \\(0 bytes\\)"),
        (b"hello, this is text", "is not an image in a supported format"),
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n",
            "is not an image in a supported format",
        ),
        (encode(noise())[:100], "could not be decoded"),
        (encode(noise(), "JPEG")[:300], "could not be decoded"),
    ],
    ids=["empty", "text", "eps", "truncated-png", "truncated-jpeg"],
)
def test_unusable_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        decode(data)
    assert info.value.status == 422


@pytest.mark.parametrize("width, height", [(200, 200), (30000, 30000), (1, 10**9 // 3)])
def test_pixel_bombs_are_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageError, match="over the limit of 10000 \\(VAE_MAX_PIXELS\\)") as info:
        decode(png_header_only(width, height), max_pixels=10_000)
    assert info.value.status == 413


def test_channel_conversion_and_resize_of_arrays() -> None:
    rgb = np.zeros((3, 4, 4), dtype=np.float32)
    rgb[1] = 1.0  # pure green
    np.testing.assert_allclose(convert_channels(rgb, 1), 0.587 * np.ones((1, 4, 4)), rtol=1e-6)
    assert convert_channels(np.ones((1, 4, 4), np.float32), 3).shape == (3, 4, 4)
    resized = resize(np.ones((1, 10, 6), np.float32), 28, 28)
    assert resized.shape == GREY
    np.testing.assert_allclose(resized, 1.0, atol=1e-5)


def test_png_round_trip() -> None:
    x = stroke()[None]
    image = Image.open(io.BytesIO(to_png(x)))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
    np.testing.assert_array_equal(np.asarray(image) / 255.0, x[0])
    rgb = Image.open(io.BytesIO(to_png(np.zeros(RGB, np.float32))))
    assert rgb.mode == "RGB"


@pytest.mark.parametrize("count, columns, rows", [(2, 2, 1), (4, 2, 2), (5, 3, 2), (16, 4, 4)])
def test_grid_is_near_square(count: int, columns: int, rows: int) -> None:
    grid = Image.open(io.BytesIO(grid_png(np.ones((count, *GREY), np.float32))))
    assert grid.size == (columns * 30 + 2, rows * 30 + 2)


def test_a_grid_of_one_is_the_image_and_a_strip_is_one_row() -> None:
    x = stroke()[None]
    assert grid_png(x[None]) == to_png(x)  # no border: the same PNG as the JSON answer's
    strip = Image.open(io.BytesIO(grid_png(np.ones((8, *GREY), np.float32), columns=8)))
    assert strip.size == (8 * 30 + 2, 32)


def pillow_only(monkeypatch: pytest.MonkeyPatch, data: bytes, shape: tuple[int, int, int]) -> Any:
    """The same upload decoded with the libspng path switched off: Pillow alone."""
    with monkeypatch.context() as patch:
        patch.setattr(imaging, "_plain_png", lambda data, channels, max_pixels: None)
        return decode(data, shape)


@pytest.mark.parametrize(
    "pixels, shape",
    [
        (noise(), GREY),
        (stroke(), GREY),
        (noise(size=56), GREY),  # resized after decoding
        (noise(size=10), GREY),
        (np.random.default_rng(1).random((40, 30, 3)), RGB),
        (np.random.default_rng(2).random((28, 28, 3)), RGB),
    ],
    ids=["grey", "stroke", "grey-56", "grey-10", "rgb-40x30", "rgb"],
)
def test_plain_pngs_decode_through_libspng_exactly_as_through_pillow(
    monkeypatch: pytest.MonkeyPatch, pixels: np.ndarray, shape: tuple[int, int, int]
) -> None:
    data = encode(pixels)
    loads = []
    monkeypatch.setattr(
        imaging.pyspng, "load", lambda d, load=imaging.pyspng.load: loads.append(1) or load(d)
    )
    out = decode(data, shape)
    assert loads == [1]  # the fast path was taken
    expected = pillow_only(monkeypatch, data, shape)
    assert out.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "data, shape",
    [
        (encode(np.random.default_rng(2).random((28, 28, 3))), GREY),  # needs Pillow's luma
        (encode(stroke()), RGB),
        (encode(stroke(), mode="RGBA"), GREY),
        (encode(stroke(), mode="LA"), GREY),
        (encode(stroke(), mode="P"), GREY),
        (encode(stroke(), mode="1"), GREY),
        (encode(stroke(), mode="I;16"), GREY),
        (encode(stroke(), "BMP"), GREY),
    ],
    ids=["rgb-to-grey", "grey-to-rgb", "rgba", "la", "palette", "1-bit", "16-bit", "bmp"],
)
def test_other_images_go_to_pillow(
    monkeypatch: pytest.MonkeyPatch, data: bytes, shape: tuple[int, int, int]
) -> None:
    def refuse(data: bytes) -> None:
        raise AssertionError("libspng was asked to decode an image Pillow must convert")

    monkeypatch.setattr(imaging.pyspng, "load", refuse)
    assert decode(data, shape).shape == shape


def test_a_corrupt_plain_png_is_named_by_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(encode(noise()))
    data[60:80] = b"\xff" * 20  # inside the IDAT stream; the IHDR still reads as 8-bit grey
    with pytest.raises(ImageError, match="could not be decoded") as info:
        decode(bytes(data))
    assert info.value.status == 422


def image_file(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", imaging.FORMATS)
def test_every_format_declares_its_size_before_decoding(fmt: str) -> None:
    data = image_file(Image.new("RGB" if fmt == "JPEG" else "L", (40, 30)), fmt)
    assert imaging.declared_size(data) == (40, 30)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n"])
def test_no_image_declares_no_size(data: bytes) -> None:
    assert imaging.declared_size(data) == (0, 0)


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
        ("PNG", {"optimize": True}),
    ],
)
def test_small_files_declaring_many_pixels_are_planned_by_their_header(
    fmt: str, options: dict[str, Any]
) -> None:
    # a few kilobytes that decode to 4 million pixels: never decoded on the event loop, and
    # refused before decoding when over the limit, in every format
    data = image_file(Image.new("L", (2048, 2048)), fmt, **options)
    assert len(data) <= imaging.SMALL_BYTES
    assert imaging.plan_uploads([("image 0", data)], max_pixels=LIMIT) is False
    small = image_file(Image.new("L", (28, 28)), fmt, **options)
    assert imaging.plan_uploads([("image 0", small)] * 3, max_pixels=LIMIT) is True
    with pytest.raises(ImageError) as info:
        imaging.plan_uploads([("image 0", small), ("image 1", data)], max_pixels=1_000_000)
    assert str(info.value) == (
        "image 1 is 2048x2048 = 4194304 pixels, over the limit of 1000000 (VAE_MAX_PIXELS)"
    )
    assert info.value.status == 413


def test_the_pixels_of_all_uploads_are_bounded_together() -> None:
    tile = image_file(Image.new("L", (100, 100)), "GIF")
    assert imaging.plan_uploads([("a", tile)] * 3, max_pixels=30_000) is True
    with pytest.raises(ImageError, match=r"^the request's 4 images declare 40000 pixels, over"):
        imaging.plan_uploads([("a", tile)] * 4, max_pixels=30_000)


def digit_in_alpha() -> Image.Image:
    """A white RGBA image whose digit (the stroke) is drawn in the alpha channel alone."""
    alpha = Image.fromarray((stroke() * 255).astype(np.uint8))
    white = Image.new("L", (28, 28), 255)
    return Image.merge("RGBA", (white, white, white, alpha))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_onto_the_training_background(mode: str) -> None:
    data = image_file(digit_in_alpha().convert(mode), "PNG")
    np.testing.assert_allclose(decode(data)[0], stroke(), atol=1 / 255)
    on_white = decode_image(data, GREY, max_pixels=LIMIT, strict=False, background=1.0)
    np.testing.assert_allclose(on_white, 1.0, atol=1 / 255)  # white strokes on white


def test_a_transparent_palette_entry_is_the_background() -> None:
    image = Image.fromarray((stroke() * 255).astype(np.uint8)).convert("P")
    data = image_file(image, "PNG", transparency=255)  # the stroke's colour is see-through
    np.testing.assert_allclose(decode(data)[0], 0.0, atol=1 / 255)


def test_float_images_outside_zero_one_are_refused_not_clipped() -> None:
    x = stroke()
    inside = image_file(Image.fromarray(x, mode="F"), "TIFF")
    np.testing.assert_allclose(decode(inside)[0], x, atol=1e-6)
    outside = image_file(Image.fromarray(x * 255.0, mode="F"), "TIFF")  # 0-255 in a float TIFF
    with pytest.raises(ImageError) as info:
        decode(outside)
    assert str(info.value) == (
        "is a F image with values in [0, 255]; float images must hold values in [0, 1] (convert "
        "a 0-255 float image to 8-bit, or divide it by 255)"
    )
    assert info.value.status == 422
