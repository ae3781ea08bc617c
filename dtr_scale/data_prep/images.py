"""One source image -> the uint8 RGB square the autoencoder sees, or a reason why not.

Bad input never stops a run: an image that cannot be used raises `BadImage` (prep skips it and lists it
in the report); an unusual one (CMYK, grayscale, palette, 16-bit, ...) is converted and the conversion noted.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Same cap as PIL's decompression-bomb guard (~89.5 Mpixel); ImageNet's largest image is ~15 Mpixel.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImage(Exception):
    """An input image that is skipped; `reason`: empty, corrupt, truncated, huge, unsupported, unreadable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def open_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily: header only) an encoded image, refusing empty, unreadable and oversized ones."""
    if not data:
        raise BadImage("empty", "the file has 0 bytes")
    try:
        with warnings.catch_warnings():
            # PIL's bomb warning would fire per image; the size check below reports it once, as a skip.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImage("huge", str(err)) from None
    except Image.UnidentifiedImageError:
        raise BadImage("corrupt", "not an image format PIL can identify") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many types; any of them means "unreadable"
        raise unreadable(err) from None
    check_size(image, max_pixels)
    return image


def unreadable(err: Exception) -> BadImage:
    truncated = "truncated" in str(err).lower() or isinstance(err, EOFError)
    return BadImage("truncated" if truncated else "corrupt", f"{type(err).__name__}: {err}")


def check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage("huge", f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} "
                               "(raise it with --max-pixels if the image is genuine)")
    if width == 0 or height == 0:
        raise BadImage("empty", f"{width}x{height} pixels")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(decoded RGB image, the source mode if it was converted)."""
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - as in open_image_bytes
        raise unreadable(err) from None
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in SIXTEEN_BIT_MODES:
        # PIL's convert("RGB") clips 16-bit values at 255 instead of rescaling them.
        wide = np.asarray(image, dtype=np.float64).clip(0, 65535)
        return Image.fromarray((wide / 257.0).round().astype(np.uint8)).convert("RGB"), mode
    if mode == "F":
        raise BadImage("unsupported", "floating-point image (mode F) has no defined pixel range")
    return image.convert("RGB"), mode


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion image_datasets.py, used by DiT): BOX-halve while the short side is
    at least twice the target, BICUBIC-resize the short side to it, crop the center. uint8 [S, S, 3]."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def prepare_image(image: Image.Image, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """(uint8 RGB [resolution, resolution, 3], converted-from mode or None); raises BadImage."""
    check_size(image, max_pixels)
    rgb, converted = to_rgb(image)
    return center_crop_arr(rgb, resolution), converted
