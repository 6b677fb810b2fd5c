"""A VAE of its own in place of the model's (`vae=`), as community models recommend one (e.g.
vae-ft-mse-840000): a diffusers VAE folder (config.json + weights), or one file in CompVis layout
(`encoder.down.0.block.0...`, with or without `first_stage_model.`) or diffusers layout
(`encoder.down_blocks.0.resnets.0...`). The model's own VAE config gives the shapes and the latent
scale: a replacement VAE must have the same architecture."""
import os

from stable_diffusion.loading.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.loading.diffusers_folder import rename_legacy_attention_keys
from stable_diffusion.loading.state_dict import IGNORED_KEY, build_model, read_json

COMPVIS_PREFIX = "first_stage_model."
COMPVIS_ONLY_PARTS = (".down.0.", ".mid.block_1.", ".mid.attn_1.", ".up.0.")
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_vae(path, base_config, unet_config, dtype="float32"):
    """The VAE at `path`, built with the model's VAE config (or the folder's own, which must agree)."""
    from stable_diffusion.loading.single_file import split_compvis_state_dict
    config = dict(base_config)
    if os.path.isdir(path):
        folder_config = read_json(os.path.join(path, "config.json"))
        config.update({k: v for k, v in folder_config.items() if not k.startswith("_")})
        weights = next((os.path.join(path, n) for n in VAE_WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))), None)
        if weights is None:
            raise CheckpointError(f"no VAE weights in {path}: expected one of {VAE_WEIGHT_NAMES}")
        path = weights
    elif not os.path.isfile(path):
        raise CheckpointError(f"VAE {path} is neither a file nor a diffusers VAE folder")
    state = read_state_dict(path)
    if not any(k.startswith(("encoder.", "decoder.", COMPVIS_PREFIX)) for k in state):
        raise CheckpointError(f"{path} is not a VAE: it has no encoder./decoder. weights (first keys: "
                              f"{sorted(state)[:3]})")
    if any(part in key for key in state for part in COMPVIS_ONLY_PARTS):
        state = {k if k.startswith(COMPVIS_PREFIX) else COMPVIS_PREFIX + k: v for k, v in state.items()
                 if not k.startswith("model_ema.")}
        state = split_compvis_state_dict(state, unet_config, config, path)["vae"]
    else:
        state = rename_legacy_attention_keys({k: v for k, v in state.items() if not IGNORED_KEY.search(k)})
    return build_model("vae", config, state, path, dtype)
