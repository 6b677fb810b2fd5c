"""Results as a docarray 0.x DocumentArray, shaped as the original PaddleHub module's, and saved files.

da[p]                 one Document per prompt; its uri is the merged grid of the batch's final images
da[p].chunks[j]       image j: final PNG as a data URI, tags; its chunks are the frames, the final last
da[p].chunks[-1]      the merged grid (tags['image idx'] == 'merged'); its chunks are the merged frames
"""
import base64
import io
import math
import os
import re
import tempfile

import numpy as np
from docarray import Document, DocumentArray
from PIL import Image, PngImagePlugin

from stable_diffusion.parameters import PNG_KEY

MAX_NAME_CHARS = 48


def write_png(image, file, parameters=None):
    """uint8 [H, W, 3] as PNG, with the `parameters` text chunk when given (parameters.py)."""
    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_KEY, parameters)  # iTXt: UTF-8, as A1111 writes non-Latin prompts
    Image.fromarray(image).save(file, format="PNG", pnginfo=info)


def png_data_uri(image, parameters=None):
    buffer = io.BytesIO()
    write_png(image, buffer, parameters)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def grid(images):
    """Tile [B, H, W, 3] images into one image, as square as possible."""
    count, height, width, _ = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = np.zeros((rows * height, cols * width, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return canvas


def safe_file_stem(prompt):
    """A file name from a prompt: letters, digits, '-' and '_' only, bounded; never a path."""
    stem = re.sub(r"[^\w-]+", "_", prompt, flags=re.UNICODE).strip("_")[:MAX_NAME_CHARS]
    while len(stem.encode("utf-8")) > 120:
        stem = stem[:-1]
    return stem or "image"


def save_png_atomically(image, output_dir, stem, parameters=None):
    """Write `stem.png` in output_dir (or `stem-N.png` if taken) via a temporary file and a rename."""
    os.makedirs(output_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=output_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            write_png(image, f, parameters)
        for n in range(10000):
            path = os.path.join(output_dir, f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            try:
                os.link(tmp, path)  # fails if the name is taken: never overwrites another run's image
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"too many images named {stem}*.png in {output_dir}")
    finally:
        os.unlink(tmp)


def build_prompt_document(prompt, images, frames, tags, output_dir=None, parameters=None):
    """images: final uint8 [B, H, W, 3]; frames: [(step, uint8 [B, H, W, 3])], the final one last;
    parameters: each image's parameters text (the merged grid gets the first's, as in A1111)."""
    parameters = parameters or [None] * len(images)
    prompt_doc = Document(tags={"prompt": prompt, **tags})
    saved = []
    stem = safe_file_stem(prompt)
    for j, image in enumerate(images):
        image_doc = Document(uri=png_data_uri(image, parameters[j]), tags={"prompt": prompt, "image idx": j, **tags})
        # The last frame is the final image: the same PNG, its parameters included.
        image_doc.chunks = DocumentArray(
            [Document(uri=png_data_uri(f[j], parameters[j] if k == len(frames) - 1 else None), tags={"step": step})
             for k, (step, f) in enumerate(frames)])
        prompt_doc.chunks.append(image_doc)
        if output_dir is not None:
            saved.append(save_png_atomically(image, output_dir, f"{stem}_seed{tags['seed']}_{j}", parameters[j]))
    merged = grid(images)
    merged_doc = Document(uri=png_data_uri(merged, parameters[0]), tags={"prompt": prompt, "image idx": "merged", **tags})
    merged_doc.chunks = DocumentArray(
        [Document(uri=png_data_uri(grid(f), parameters[0] if k == len(frames) - 1 else None), tags={"step": step})
         for k, (step, f) in enumerate(frames)])
    prompt_doc.chunks.append(merged_doc)
    prompt_doc.uri = merged_doc.uri
    if output_dir is not None and len(images) > 1:
        saved.append(save_png_atomically(merged, output_dir, f"{stem}_seed{tags['seed']}_merged", parameters[0]))
    prompt_doc.tags["files"] = saved
    return prompt_doc
