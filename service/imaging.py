"""Images in and out: decode uploads safely into model arrays, turn model arrays into PNGs."""

import functools
import io
import math
from typing import Any

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

F32 = np.ndarray[Any, np.dtype[np.float32]]

# Formats decoded in-process by Pillow alone; EPS and friends would shell out, so they are refused.
# Each declares its pixel count in a header that bounds what decoding produces (ICO does not: its
# directory can name 16x16 and hold a PNG of millions of pixels, so it is not taken).
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "PPM", "TGA")
RESAMPLE = Image.Resampling.LANCZOS
# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L, so arrays and uploads convert alike.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageError(ValueError):
    """An input image that cannot be used; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=FORMATS)


def decode_image(
    data: bytes,
    shape: tuple[int, int, int],
    *,
    max_pixels: int,
    strict: bool,
    background: float = 0.0,
) -> F32:
    """Encoded image bytes -> float32 `(C, H, W)` in [0, 1] at the model's size.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    would inflate to gigabytes (a decompression bomb) is refused cheaply. Transparent pixels are
    composited onto `background`, the grey level of the training images' background (the
    manifest's `image.background`; 0, black, for MNIST).
    """
    c, h, w = shape
    if not data:
        raise ImageError("is empty (0 bytes)")
    pixels = _plain_png(data, c, max_pixels)
    if pixels is not None:
        height, width = pixels.shape[:2]
        _check_strict(width, height, shape, strict)
        array = pixels.astype(np.float32) / np.float32(255.0)
        return resize(array[None] if c == 1 else np.moveaxis(array, -1, 0), h, w)
    try:
        image = _open(data)
    except UnidentifiedImageError:
        raise ImageError(f"is not an image in a supported format ({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"is a likely decompression bomb, over the limit of {max_pixels} (VAE_MAX_PIXELS)", 413
        ) from None
    except Exception as exc:  # Pillow plugins raise assorted errors on malformed headers
        raise _undecodable(exc) from None
    width, height = image.size
    check_pixels(width * height, max_pixels, f"is {width}x{height} =")
    _check_strict(width, height, shape, strict)
    try:
        image.draft("L" if c == 1 else "RGB", (w, h))  # JPEG: decode at a reduced scale
        image.load()
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        raise _undecodable(exc) from None
    return resize(_to_array(image, c, background), h, w)


def check_pixels(pixels: int, max_pixels: int, what: str) -> None:
    """413 (as an ImageError) when `pixels` are over VAE_MAX_PIXELS; `what` starts the message."""
    if pixels > max_pixels:
        raise ImageError(
            f"{what} {pixels} pixels, over the limit of {max_pixels} (VAE_MAX_PIXELS)", 413
        )


def _check_strict(width: int, height: int, shape: tuple[int, int, int], strict: bool) -> None:
    _, h, w = shape
    if strict and (width, height) != (w, h):
        raise ImageError(f"is {width}x{height}; the model takes {w}x{h} (VAE_STRICT_SIZE is on)")


def fit_array(array: F32, shape: tuple[int, int, int], *, strict: bool) -> F32:
    """A decoded `(C', H', W')` array in [0, 1] at the model's channels and size, by the rule
    `decode_image` applies to files; ImageError when `strict` and its size differs."""
    height, width = array.shape[1:]
    _check_strict(width, height, shape, strict)
    c, h, w = shape
    return resize(convert_channels(array, c), h, w)


def declared_size(data: bytes) -> tuple[int, int]:
    """`(width, height)` an upload declares in its header, read before any pixel is decoded, for
    every format accepted (Pillow's `Image.open` parses only the header); (0, 0) when the bytes
    are no image in such a format, or one over Pillow's own bound (decoding then fails at once,
    naming why)."""
    size = _png_size(data)
    if size is not None:
        return size
    try:
        with _open(data) as image:
            return image.size
    except Exception:  # not an image, a malformed header, a bomb: assorted exception types
        return 0, 0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An upload at most this big (and, for a PNG, of at most SMALL_PIXELS) decodes in well under a
# millisecond, so a few of them are decoded on the event loop rather than paying a thread hop.
SMALL_BYTES = 64 * 1024
SMALL_PIXELS = 512 * 512


def _png_size(data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from a PNG's IHDR chunk (the format puts it first); None if no PNG."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def plan_uploads(uploads: list[tuple[str, bytes]], max_pixels: int) -> bool:
    """Check what a request's uploads (`(label, bytes)`) declare before any is decoded: 413 (an
    ImageError) when one, or all of them together, are over VAE_MAX_PIXELS, which bounds a
    request's decoding work. Returns whether each is small (few bytes declaring few pixels; a
    PNG, WebP, GIF or TIFF can declare millions of pixels in a few hundred bytes), i.e. cheap
    enough to decode on the event loop."""
    small, total = True, 0
    for label, data in uploads:
        width, height = declared_size(data)
        check_pixels(width * height, max_pixels, f"{label} is {width}x{height} =")
        total += width * height
        small = small and len(data) <= SMALL_BYTES and width * height <= SMALL_PIXELS
    check_pixels(total, max_pixels, f"the request's {len(uploads)} images declare")
    return small


def _plain_png(data: bytes, channels: int, max_pixels: int) -> np.ndarray[Any, Any] | None:
    """The pixels of an 8-bit PNG already in the model's colour type (grey for 1 channel, RGB for
    3), `(H, W)` or `(H, W, 3)` uint8, decoded by libspng; None for any other file.

    The common upload, decoded in a few microseconds where Pillow's Python-level PNG parsing
    costs about 30 (bench/request_cost.py). Everything else goes to Pillow, as does anything
    libspng refuses, so that Pillow's checks name the problem. The size comes from the IHDR
    chunk (which the PNG format puts first) and is checked before any pixel is decoded.
    """
    size = _png_size(data)
    if size is None:
        return None
    width, height = size
    bit_depth, colour_type = data[24], data[25]
    if bit_depth != 8 or colour_type != (0 if channels == 1 else 2):
        return None
    if not 0 < width * height <= max_pixels:
        return None  # Pillow's path answers 413 (or names the bad header)
    try:
        pixels: np.ndarray[Any, Any] = pyspng.load(data)
    except Exception:  # corrupt or truncated: Pillow's path says how
        return None
    return pixels


NPY_MEDIA = ("application/x-npy", "application/npy")
NPY_DTYPES = ("uint8 (0-255)", "bool", "float16/32/64 in [0, 1]")


def _npy_prefix(data: bytes) -> bytes:
    """The magic string, version, header length and header of a .npy body (the format's layout:
    2-byte length for version 1, 4-byte for 2 and 3); the body itself when it is no .npy, so
    numpy's own reader names the problem."""
    if len(data) < 12 or not data.startswith(b"\x93NUMPY"):
        return data
    length_bytes = 2 if data[6] == 1 else 4
    start = 8 + length_bytes
    return data[: start + int.from_bytes(data[8:start], "little")]


@functools.lru_cache(maxsize=64)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """`(shape, fortran_order, dtype, data offset)` read by numpy's own header parser.

    Cached by the header's bytes: a client sends the same header with every batch, and numpy
    parses it with `ast.literal_eval`, a compile per call (about 40 us). Failures are not cached.
    """
    stream = io.BytesIO(prefix)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return shape, fortran, dtype, stream.tell()


def read_npy(
    data: bytes, *, max_images: int, max_pixels: int, images_limit: str = "VAE_MAX_ROWS"
) -> F32:
    """A NumPy `.npy` body -> float32 `(B, C, H, W)` in [0, 1] at the sender's size.

    `images_limit` names what sets `max_images` in the error (the server's setting by default).

    Shapes: `(H, W)` one grey image, `(B, H, W)` grey images, `(B, C, H, W)` with C of 1 or 3
    (the encoder's own layout). uint8 is scaled by 1/255, bool to 0/1; floats must be finite and
    in [0, 1]. The header is read and checked (no pickles, shape within the limits) before any
    pixel is, so an oversized array is refused without allocating it.
    """
    try:
        shape, fortran, dtype, offset = _npy_header(_npy_prefix(data))
    except Exception as exc:  # bad magic, header or version: several exception types
        raise ImageError(f"is not a NumPy .npy array ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject or dtype.kind not in "buf" or (dtype.kind == "u" and dtype.itemsize != 1):
        raise ImageError(f"has dtype {dtype}; send {', '.join(NPY_DTYPES)}")
    if len(shape) == 2:
        shape = (1, 1, *shape)
    elif len(shape) == 3:
        shape = (shape[0], 1, *shape[1:])
    elif len(shape) != 4 or shape[1] not in (1, 3):
        raise ImageError(
            f"has shape {shape}; send (H, W), (B, H, W) or (B, C, H, W) with C = 1 or 3"
        )
    b, _, h, w = shape
    if min(shape) <= 0:
        raise ImageError(f"has shape {shape}: no pixels (every dimension must be positive)")
    if b > max_images:
        raise ImageError(f"holds {b} images, over the limit of {max_images} ({images_limit})")
    check_pixels(b * h * w, max_pixels, f"holds {b} images of {w}x{h} =")
    count = math.prod(shape)
    body = data[offset:]
    if len(body) != count * dtype.itemsize:
        raise ImageError(
            f"has {len(body)} bytes of data; its header ({dtype}, shape {shape}) needs "
            f"{count * dtype.itemsize}: truncated?"
        )
    array = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if dtype.kind == "u":
        return array.astype(np.float32) / np.float32(255.0)
    if dtype.kind == "b":
        return array.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        pixels = array.astype(np.float32)
        if not np.isfinite(pixels).all():
            raise ImageError("has values that are not finite (NaN or infinity) in float32")
        if pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ImageError(
                f"has values in [{pixels.min():.4g}, {pixels.max():.4g}]; floats must be in "
                "[0, 1] (or send uint8 in 0-255)"
            )
    return pixels


def _undecodable(exc: Exception) -> ImageError:
    return ImageError(f"could not be decoded, truncated or corrupt? ({type(exc).__name__}: {exc})")


def _to_array(image: Image.Image, channels: int, background: float) -> F32:
    """A decoded Pillow image -> float32 `(C, H, W)` in [0, 1] with the model's channels.

    Integer images scale by their full range (255, or 65535 for 16-bit); float images ("F", as
    in a float TIFF) must already hold values in [0, 1]: anything else is refused rather than
    clipped, since no scale can be guessed. Transparency is composited onto `background`.
    """
    if image.mode in HIGH_BIT_MODES:
        # 16-bit grey (and float) keep their precision instead of Pillow's 8-bit clipping
        scale = 1.0 if image.mode == "F" else 65535.0
        grey = np.asarray(image, dtype=np.float32)
        with np.errstate(invalid="ignore"):
            low, high = float(grey.min()), float(grey.max())
        if not (np.isfinite(grey).all() and low >= 0.0 and high <= scale):
            kind = "float images" if image.mode == "F" else f"{image.mode} images"
            raise ImageError(
                f"is a {image.mode} image with values in [{low:.4g}, {high:.4g}]; {kind} must "
                f"hold values in [0, {scale:g}] (convert a 0-255 float image to 8-bit, or "
                "divide it by 255)"
            )
        return np.repeat((grey / np.float32(scale))[None], channels, axis=0)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / np.float32(255.0)
        alpha = rgba[..., 3:]
        rgb = rgba[..., :3] * alpha + np.float32(background) * (1.0 - alpha)  # "over" onto it
        array = np.moveaxis(rgb, -1, 0)
        return convert_channels(array.astype(np.float32), channels)
    converted = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(converted, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else np.moveaxis(array, -1, 0)


def convert_channels(array: F32, channels: int) -> F32:
    """`(C', H, W)` with C' in {1, 3} -> `(channels, H, W)`: grey repeated or RGB to luma."""
    if array.shape[0] == channels:
        return array
    if array.shape[0] == 1:
        return np.repeat(array, channels, axis=0)
    return np.tensordot(LUMA, array, axes=1)[None].astype(np.float32)


def resize(array: F32, height: int, width: int) -> F32:
    """Resize each channel of `(C, H, W)` with a Lanczos filter, clipped back to [0, 1]."""
    if array.shape[1:] == (height, width):
        return np.ascontiguousarray(array, dtype=np.float32)
    planes = [
        np.asarray(Image.fromarray(plane).resize((width, height), RESAMPLE))
        for plane in array.astype(np.float32, copy=False)
    ]
    resized: F32 = np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)
    return resized


def _to_pil(array: F32) -> Image.Image:
    """`(C, H, W)` in [0, 1] -> an 8-bit L or RGB image."""
    pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0])
    return Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels, 0, -1)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_png(array: F32) -> bytes:
    """One image `(C, H, W)` in [0, 1] -> PNG bytes."""
    return _png(_to_pil(array))


def grid_png(arrays: F32, padding: int = 2, columns: int | None = None) -> bytes:
    """Images `(B, C, H, W)` in [0, 1] -> one PNG: a grid on a black background, near-square
    unless `columns` is given (B columns: a strip). One image is that image, with no border, as
    the JSON answer has it."""
    b, c, h, w = arrays.shape
    if b == 1:
        return to_png(arrays[0])
    columns = min(columns or math.ceil(math.sqrt(b)), b)
    rows = math.ceil(b / columns)
    canvas = np.zeros(
        (c, rows * (h + padding) + padding, columns * (w + padding) + padding), dtype=np.float32
    )
    for i, image in enumerate(arrays):
        top = padding + (i // columns) * (h + padding)
        left = padding + (i % columns) * (w + padding)
        canvas[:, top : top + h, left : left + w] = image
    return _png(_to_pil(canvas))
