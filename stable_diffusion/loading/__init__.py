"""Find Stable Diffusion weights and load them into the Paddle models.

Sources (sources.py): a diffusers model folder (local, or a Hub repo id fetched into the Hugging Face
cache), or a single CompVis-layout `.safetensors` / `.ckpt` file as community models ship them. Our
parameter names are diffusers', so a folder loads by name (diffusers_folder.py); a single file goes
through a key table first (single_file.py). Files are read without PyTorch (checkpoint_files.py).
"""
import os

from stable_diffusion.loading.checkpoint_files import CheckpointError
from stable_diffusion.loading.diffusers_folder import load_folder
from stable_diffusion.loading.single_file import load_single_file
from stable_diffusion.loading.sources import DEFAULT_MODEL, resolve_source
from stable_diffusion.loading.state_dict import StableDiffusionModels


def load_models(source=None, dtype="float32", variant=None, skip_weights=()):
    """Load from a folder, a single file, or a Hub repo id (default: SD v1.5). Components named in
    `skip_weights` are built without their weights."""
    path = resolve_source(source, variant)
    if os.path.isdir(path):
        return load_folder(path, dtype, variant, skip_weights)
    return load_single_file(path, dtype, skip_weights=skip_weights)
