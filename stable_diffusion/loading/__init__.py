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
from stable_diffusion.loading.vae_file import load_vae


def load_models(source=None, dtype="float32", variant=None, skip_weights=(), loras=(), vae=None,
                prediction_type=None):
    """Load from a folder, a single file, or a Hub repo id (default: SD v1.5). Components named in
    `skip_weights` are built without their weights. `loras`: [(file, weight), ...] merged into the
    UNet and text encoder (adapters/lora.py); `vae`: a VAE of its own (vae_file.py);
    `prediction_type`: 'epsilon' or 'v_prediction' where the weights cannot tell (SD 2.x files)."""
    from stable_diffusion.adapters import adapter_keys  # adapters/ reads files with loading/'s readers
    from stable_diffusion.adapters.lora import merge_loras
    path = resolve_source(source, variant)
    skip = tuple(skip_weights) + (("vae",) if vae else ())
    if os.path.isdir(path):
        models = load_folder(path, dtype, variant, skip)
    else:
        models = load_single_file(path, dtype, skip_weights=skip, prediction_type=prediction_type)
    if prediction_type is not None:
        models.scheduler_config = {**models.scheduler_config, "prediction_type": prediction_type}
    if vae:
        models.vae = load_vae(vae, models.vae.config, models.unet.config)
    merge_loras(models, loras)
    models.adapters = adapter_keys(loras, vae)
    return models
