"""Find Stable Diffusion weights and load them into the Paddle models.

Sources: a diffusers model folder (local, or a Hub repo id fetched into the Hugging Face cache), or a
single CompVis-layout `.safetensors` / `.ckpt` file as community models ship them. Our parameter names
are diffusers', so a folder loads by name; a single file goes through `compvis_key_table`.
"""
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn

from stable_diffusion.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.models.clip import CLIPTextModel
from stable_diffusion.models.unet import UNET_DEFAULTS, UNet2DConditionModel
from stable_diffusion.models.vae import VAE_DEFAULTS, AutoencoderKL
from stable_diffusion.tokenizer import CLIPTokenizer

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
WEIGHT_NAMES = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
MODEL_CLASSES = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
# Buffers that checkpoints carry but the models compute for themselves.
IGNORED_KEY = re.compile(r"(^|\.)position_ids$")
COMPVIS_IGNORED_KEY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights$|logvar$"
    r"|first_stage_model\.loss\.|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")


@dataclass
class StableDiffusionModels:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    source: str


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a diffusers model folder has text_encoder/, unet/, vae/, "
                              "scheduler/ and tokenizer/, each with its config") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def default_config(component):
    return read_json(os.path.join(CONFIG_DIR, f"{component}.json"))


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


def compvis_key_table(unet_config, vae_config):
    """{CompVis key prefix: (component, diffusers key prefix)} for a single-file SD 1.x checkpoint."""
    table = {}
    unet = {**UNET_DEFAULTS, **unet_config}
    lpb, blocks = unet["layers_per_block"], len(unet["block_out_channels"])
    resnet_parts = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

    def unet_resnet(src, dst):
        for a, b in resnet_parts.items():
            table[f"model.diffusion_model.{src}.{a}."] = ("unet", f"{dst}.{b}.")

    def unet_plain(src, dst):
        table[f"model.diffusion_model.{src}."] = ("unet", f"{dst}.")

    unet_plain("time_embed.0", "time_embedding.linear_1")
    unet_plain("time_embed.2", "time_embedding.linear_2")
    unet_plain("input_blocks.0.0", "conv_in")
    for i, block_type in enumerate(unet["down_block_types"]):
        for j in range(lpb):
            n = 1 + i * (lpb + 1) + j
            unet_resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            if block_type.startswith("CrossAttn"):
                unet_plain(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}")
        if i < blocks - 1:
            unet_plain(f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    unet_resnet("middle_block.0", "mid_block.resnets.0")
    unet_plain("middle_block.1", "mid_block.attentions.0")
    unet_resnet("middle_block.2", "mid_block.resnets.1")
    for i, block_type in enumerate(unet["up_block_types"]):
        has_attention = block_type.startswith("CrossAttn")
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            unet_resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if has_attention:
                unet_plain(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}")
        if i < blocks - 1:
            n = i * (lpb + 1) + lpb
            unet_plain(f"output_blocks.{n}.{2 if has_attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    unet_plain("out.0", "conv_norm_out")
    unet_plain("out.2", "conv_out")

    vae = {**VAE_DEFAULTS, **vae_config}
    vae_blocks, vae_lpb = len(vae["block_out_channels"]), vae["layers_per_block"]
    attention_parts = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

    def vae_plain(src, dst):
        table[f"first_stage_model.{src}."] = ("vae", f"{dst}.")

    def vae_resnet(src, dst):
        for a, b in {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "conv_shortcut"}.items():
            vae_plain(f"{src}.{a}", f"{dst}.{b}")

    for part in ("encoder", "decoder"):
        vae_plain(f"{part}.conv_in", f"{part}.conv_in")
        vae_plain(f"{part}.norm_out", f"{part}.conv_norm_out")
        vae_plain(f"{part}.conv_out", f"{part}.conv_out")
        vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        for a, b in attention_parts.items():
            vae_plain(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}")
    for i in range(vae_blocks):
        for j in range(vae_lpb):
            vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < vae_blocks - 1:
            vae_plain(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        level = vae_blocks - 1 - i  # the decoder's up blocks run from the deepest level
        for j in range(vae_lpb + 1):
            vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < vae_blocks - 1:
            vae_plain(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    vae_plain("quant_conv", "quant_conv")
    vae_plain("post_quant_conv", "post_quant_conv")

    table["cond_stage_model.transformer.text_model."] = ("text_encoder", "")
    return table


def split_compvis_state_dict(state, unet_config, vae_config, where):
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(f"{where} is an SD 2.x single file (OpenCLIP text encoder), which is not "
                              "supported: use that model's diffusers folder instead")
    table = compvis_key_table(unet_config, vae_config)
    prefixes = sorted(table, key=len, reverse=True)
    parts = {component: {} for component in MODEL_CLASSES}
    unknown = []
    for key, value in state.items():
        if COMPVIS_IGNORED_KEY.search(key):
            continue
        if key.startswith("cond_stage_model.transformer.") and not key.startswith(
                "cond_stage_model.transformer.text_model."):
            key = key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1)
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        component, target = table[prefix]
        parts[component][target + key[len(prefix):]] = value
    if unknown:
        raise CheckpointError(f"{where} has {len(unknown)} keys that are not part of a Stable Diffusion 1.x "
                              f"checkpoint (first: {sorted(unknown)[:3]}); is it a LoRA, a VAE alone, or "
                              "another model family?")
    return parts


def load_single_file(path, dtype="float32", configs=None, skip_weights=()):
    """A CompVis-layout `.safetensors`/`.ckpt`; `configs` overrides the SD v1 configs per component."""
    configs = {c: (configs or {}).get(c) or default_config(c) for c in (*MODEL_CLASSES, "scheduler")}
    state = read_state_dict(path)
    parts = split_compvis_state_dict(state, configs["unet"], configs["vae"], path)
    models = {c: build_model(c, configs[c], None if c in skip_weights else parts[c], f"{path} ({c})", dtype)
              for c in MODEL_CLASSES}
    return StableDiffusionModels(CLIPTokenizer.from_folder(), scheduler_config=configs["scheduler"],
                                 source=path, **models)


def download_from_hub(repo_id, variant=None):
    """Fetch only what inference needs into the Hugging Face cache (HF_HOME); returns the folder."""
    from huggingface_hub import snapshot_download
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                f"text_encoder/model{suffix}", f"unet/diffusion_pytorch_model{suffix}",
                f"vae/diffusion_pytorch_model{suffix}"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, point at local weights: a diffusers model folder or a .safetensors/.ckpt "
            "file, as `model=` or the STABLE_DIFFUSION_MODEL environment variable.") from None


def resolve_source(source=None, variant=None):
    """The local folder or file behind a folder, a file or a Hub repo id (default: SD v1.5)."""
    source = source or DEFAULT_MODEL
    if os.path.isdir(source):
        return source
    if os.path.isfile(source):
        if not source.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise CheckpointError(f"{source}: expected a .safetensors or .ckpt file, or a diffusers folder")
        return source
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return download_from_hub(source, variant)
    raise CheckpointError(f"model {source!r} is neither an existing folder or file nor a Hub repo id "
                          "(owner/name)")


def load_models(source=None, dtype="float32", variant=None, skip_weights=()):
    """Load from a folder, a single file, or a Hub repo id (default: SD v1.5). Components named in
    `skip_weights` are built without their weights."""
    path = resolve_source(source, variant)
    if os.path.isdir(path):
        return load_folder(path, dtype, variant, skip_weights)
    return load_single_file(path, dtype, skip_weights=skip_weights)
