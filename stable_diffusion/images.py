"""Input pictures for image-to-image and inpainting: read, checked and sized before any work.

An image is a file path, a PIL image or a uint8 array ([H, W, 3], or [H, W] for a mask); through
serving, a base64 PNG/JPEG string or data URI (module.py decodes it: a client never names a server path).
"""
import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError


def read_image(value, name, mode):
    """`value` as a uint8 array in PIL `mode` ('RGB': [H, W, 3]; 'L': [H, W]); a ValueError names `name`."""
    if isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{name} as an array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                             f"{array.dtype} {list(array.shape)}")
        value = Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    elif isinstance(value, str):
        try:
            with open(value, "rb") as f:
                value = f.read()
        except OSError as err:
            raise ValueError(f"{name}: cannot read {value!r} ({err.strerror or err})") from None
    if isinstance(value, bytes):
        try:
            value = Image.open(io.BytesIO(value))
            value.load()
        except UnidentifiedImageError:
            raise ValueError(f"{name} is not an image that Pillow can read: give a PNG or JPEG file") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{name} is a truncated or damaged image ({err}): give a whole PNG or JPEG "
                             "file") from None
    if not isinstance(value, Image.Image):
        raise ValueError(f"{name} must be a file path, a PIL image or a uint8 array, got {type(value).__name__}")
    if value.mode in ("RGBA", "LA", "P") and mode == "RGB":
        # Transparent pixels become white, not black, as they show in a viewer.
        value = value.convert("RGBA")
        white = Image.new("RGBA", value.size, (255, 255, 255, 255))
        value = Image.alpha_composite(white, value)
    return np.asarray(value.convert(mode))


def decode_base64_image(text, name):
    """A base64 string or a data URI (data:image/png;base64,...) -> the file's bytes."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a base64 PNG/JPEG string or data URI, got {type(text).__name__}")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{name}: a data URI must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64: send the image file's bytes base64-encoded") from None


def resized(array, width, height):
    """Resized with Lanczos, as diffusers' image processor does, when the size differs."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.LANCZOS))


def to_model_range(image):
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def binarized_mask(mask):
    """uint8 [H, W] -> float32 [1, 1, H, W]: 1 where the picture is repainted (white), 0 where it is
    kept (black); grey splits at half, as diffusers' mask processor binarizes."""
    return (mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]
