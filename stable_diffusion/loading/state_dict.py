"""Checkpoint arrays into the Paddle models by name: our parameter names are diffusers', so loading is
a table lookup; every parameter must be found, with its shape."""
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn as nn

from stable_diffusion.loading.checkpoint_files import CheckpointError
from stable_diffusion.models.clip import CLIPTextModel
from stable_diffusion.models.unet import UNet2DConditionModel
from stable_diffusion.models.vae import AutoencoderKL
from stable_diffusion.tokenizer import CLIPTokenizer

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
MODEL_CLASSES = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
# Buffers that checkpoints carry but the models compute for themselves.
IGNORED_KEY = re.compile(r"(^|\.)position_ids$")


@dataclass
class StableDiffusionModels:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    source: str
    # What is merged into each component's weights from elsewhere, {component: (files and settings)}, e.g.
    # a LoRA file and its weight, a VAE of its own: part of the CPU graphs' key.
    adapters: dict = field(default_factory=dict)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a diffusers model folder has text_encoder/, unet/, vae/, "
                              "scheduler/ and tokenizer/, each with its config") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def default_config(component, family="sd1"):
    """The config of an SD 1.x model's component (SD v1.5's), or of an SD 2.x one (SD 2.1's)."""
    return read_json(os.path.join(CONFIG_DIR, *(() if family == "sd1" else (family,)), f"{component}.json"))


def linear_weight_names(model):
    """Paddle stores Linear weights as [in, out]; PyTorch checkpoints as [out, in]."""
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def load_state_dict(model, state_dict, where, dtype="float32"):
    """Copy a checkpoint's arrays into `model` by name. Every parameter must be found, with its shape."""
    params = dict(model.named_parameters())
    transposed = linear_weight_names(model)
    unknown = sorted(set(state_dict) - set(params))
    missing = sorted(set(params) - set(state_dict))
    if missing or unknown:
        raise CheckpointError(
            f"{where} does not match the model built from its config: "
            + (f"{len(missing)} missing keys (first: {missing[:3]})" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"{len(unknown)} unknown keys (first: {unknown[:3]})" if unknown else "")
            + ". Check that the weights belong to this config (an SD 1.x/2.x model of the same size).")
    for name, param in params.items():
        array = state_dict[name]
        if name in transposed and array.ndim == 4:
            array = array[:, :, 0, 0]  # a 1x1 convolution used as a Linear (CompVis VAE attention)
        if name in transposed:
            array = array.T
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(f"{where}: key {name!r} has shape {list(state_dict[name].shape)} in the "
                                  f"checkpoint but the model expects {list(param.shape)} (shape in PyTorch "
                                  "layout for Linear weights is transposed); the weights and config differ")
        param.set_value(np.ascontiguousarray(array, dtype=dtype))
    model.eval()
    return model


def build_model(component, config, state_dict, where, dtype):
    """The model with its weights; with state_dict None, only its structure (weights never allocated:
    for a component whose compiled graph already holds them)."""
    if state_dict is None:
        with paddle.LazyGuard():
            return MODEL_CLASSES[component](config).eval()
    # The VAE stays in fp32 whatever `dtype` is: SD's decoder overflows in fp16.
    dtype = "float32" if component == "vae" else dtype
    model = MODEL_CLASSES[component](config)
    if dtype != "float32":
        model.to(dtype=dtype)
    return load_state_dict(model, state_dict, where, dtype)
