"""Image fitting: any PIL mode and size in, (C, H, W) float in [-1, 1] out, and back to uint8."""

from __future__ import annotations

import numpy as np
import torch
from PIL import ExifTags, Image

from common.data.listing import IMAGE_EXTENSIONS

# huge scans are fine: Pillow warns (DecompressionBombWarning) above this, and refuses an image above twice this
# (DecompressionBombError: unreadable, skipped or refused as data.on_bad_image says)
Image.MAX_IMAGE_PIXELS = 256_000_000

# the decoders of the listed extensions (PNG, JPEG, ...), whatever the file's own extension says: a JPEG named .png
# is read, but an EPS, PSD or FITS file named .png is unreadable, never handed to a decoder this toolkit does not
# list (Pillow's EPS one runs Ghostscript on the file)
FORMATS = sorted({name for extension, name in Image.registered_extensions().items() if extension in IMAGE_EXTENSIONS})

# the transpose that shows an image upright, for each EXIF Orientation value (the table of ImageOps.exif_transpose)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (16-bit, palette, alpha, CMYK, float) to "L" or "RGB".

    Transparent pixels become black, the background of the glyph datasets, in every mode (alpha, palette or a
    PNG's transparent colour, 16-bit included). A float image with NaN or infinite pixels raises ValueError, so
    the data scan counts it as unreadable instead of training on whatever the cast to uint8 makes of them (black).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{np.size(array) - np.isfinite(array).sum()} of its {np.size(array)} pixels are NaN or "
                             f"infinite")
        # the white a float image means: 1.0 for images scaled to [0, 1] (as numpy/scikit-image write them),
        # else 255 or 65535 as its integer range; [0, 1] read as 0-255 would train on near-black images
        peak = 1.0 if image.mode == "F" and array.max() <= 1.0 else 65535.0 if array.max() > 255 else 255.0
        grey = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        if "transparency" in image.info:  # a 16-bit PNG's transparent grey value (tRNS): black, as in every mode
            grey[array == image.info["transparency"]] = 0
        image = Image.fromarray(grey, "L")
    if image.mode == "1":
        image = image.convert("L")
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def fit_image(image: Image.Image, size: int, fit: str) -> Image.Image:
    """Make a square `size` x `size` image: `pad` keeps all of it (letterbox on black), `crop` takes
    the centre square, `stretch` ignores the aspect ratio."""
    width, height = image.size
    if fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif fit == "pad" and width != height:
        scale = size / max(width, height)
        inner = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def fitted_array(image: Image.Image, size: int, channels: int, fit: str) -> np.ndarray:
    """A PIL image converted and fitted: (H, W, C) uint8."""
    array = np.asarray(fit_image(to_mode(image, channels), size, fit), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def fitted_arrays(pixels: np.ndarray, size: int, channels: int, fit: str) -> np.ndarray:
    """In-memory images (N, H, W[, C]) uint8, each converted and fitted: (N, size, size, channels) uint8."""
    return np.stack([fitted_array(Image.fromarray(a), size, channels, fit) for a in pixels])


def load_image(path: str, size: int, channels: int, fit: str) -> np.ndarray:
    """Read one file as a (H, W, C) uint8 array. Raises OSError/ValueError on a corrupt file.

    An animated GIF or PNG, or a multi-page TIFF, is its first frame (as viewers show it before playing)."""
    with Image.open(path, formats=FORMATS) as image:
        image.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at reduced scale
        image.load()
        return fitted_array(upright(image), size, channels, fit)


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: a phone photo is often stored sideways with an EXIF Orientation tag saying so.

    Not ImageOps.exif_transpose: it also rewrites the EXIF block without that tag, which raises struct.error on a
    malformed tag elsewhere in it (text where the tag's type is a number), crashing the scan on a readable photo."""
    method = UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return image.transpose(method) if method is not None else image


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32 in [-1, 1]."""
    return from_uint8(torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1))


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, on any device) -> float32 in [-1, 1]: the one scale every image is trained at."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
