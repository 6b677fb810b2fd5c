"""A diffusers model folder: text_encoder/, unet/, vae/, scheduler/, tokenizer/, each with its config."""
import os

from stable_diffusion.loading.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.loading.state_dict import (IGNORED_KEY, MODEL_CLASSES, StableDiffusionModels, build_model,
                                                 read_json)
from stable_diffusion.tokenizer import CLIPTokenizer

WEIGHT_NAMES = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def find_weights_file(folder, component, variant=None):
    name = WEIGHT_NAMES[component]
    candidates = ([f"{name}.{variant}.safetensors"] if variant else []) + [f"{name}.safetensors", f"{name}.bin"]
    for candidate in candidates:
        path = os.path.join(folder, component, candidate)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no weights for {component} in {os.path.join(folder, component)}: expected one of "
                          f"{candidates}")


def load_folder(folder, dtype="float32", variant=None, skip_weights=()):
    """A diffusers model folder: text_encoder/, unet/, vae/, scheduler/, tokenizer/."""
    models = {}
    for component in MODEL_CLASSES:
        config = read_json(os.path.join(folder, component, "config.json"))
        if component in skip_weights:
            models[component] = build_model(component, config, None, folder, dtype)
            continue
        path = find_weights_file(folder, component, variant)
        state = read_state_dict(path)
        if component == "text_encoder":
            state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
        else:
            state = rename_legacy_attention_keys(state)
        state = {k: v for k, v in state.items() if not IGNORED_KEY.search(k)}
        models[component] = build_model(component, config, state, path, dtype)
    scheduler_config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    tokenizer_dir = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir} is missing: the folder needs tokenizer/vocab.json and merges.txt")
    return StableDiffusionModels(CLIPTokenizer.from_folder(tokenizer_dir), scheduler_config=scheduler_config,
                                 source=folder, **models)


def rename_legacy_attention_keys(state):
    """Folders saved by diffusers before 0.14 name the VAE attention query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    renamed = {}
    for key, value in state.items():
        for old, new in legacy.items():
            if old in key:
                key = key.replace(old, new)
        renamed[key] = value
    return renamed
