"""One CompVis-layout `.safetensors`/`.ckpt` file, as community SD 1.x models ship them: its keys are
renamed to diffusers' by `compvis_key_table`, then loaded by name like a folder."""
import os
import re

import numpy as np

from stable_diffusion.loading.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.loading.state_dict import MODEL_CLASSES, StableDiffusionModels, build_model, default_config
from stable_diffusion.models.clip import CLIP_DEFAULTS
from stable_diffusion.models.unet import UNET_DEFAULTS
from stable_diffusion.models.vae import VAE_DEFAULTS
from stable_diffusion.tokenizer import CLIPTokenizer

COMPVIS_IGNORED_KEY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights$|logvar$"
    r"|first_stage_model\.loss\.|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")

# SD 2.x pads prompts with "!" (its tokenizer's pad token), SD 1.x with the end token.
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}
SD2_BASE_GLOBAL_STEP = 875000


def compvis_key_table(unet_config, vae_config):
    """{CompVis key prefix: (component, diffusers key prefix)} for a single-file SD 1.x checkpoint."""
    table = {}
    unet = {**UNET_DEFAULTS, **unet_config}
    layers, blocks = unet["layers_per_block"], len(unet["block_out_channels"])
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
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            unet_resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            if block_type.startswith("CrossAttn"):
                unet_plain(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}")
        if i < blocks - 1:
            unet_plain(f"input_blocks.{1 + i * (layers + 1) + layers}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    unet_resnet("middle_block.0", "mid_block.resnets.0")
    unet_plain("middle_block.1", "mid_block.attentions.0")
    unet_resnet("middle_block.2", "mid_block.resnets.1")
    for i, block_type in enumerate(unet["up_block_types"]):
        has_attention = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            unet_resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if has_attention:
                unet_plain(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}")
        if i < blocks - 1:
            n = i * (layers + 1) + layers
            unet_plain(f"output_blocks.{n}.{2 if has_attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    unet_plain("out.0", "conv_norm_out")
    unet_plain("out.2", "conv_out")

    vae = {**VAE_DEFAULTS, **vae_config}
    vae_blocks, vae_layers = len(vae["block_out_channels"]), vae["layers_per_block"]
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
        for j in range(vae_layers):
            vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < vae_blocks - 1:
            vae_plain(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        level = vae_blocks - 1 - i  # the decoder's up blocks run from the deepest level
        for j in range(vae_layers + 1):
            vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < vae_blocks - 1:
            vae_plain(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    vae_plain("quant_conv", "quant_conv")
    vae_plain("post_quant_conv", "post_quant_conv")

    table["cond_stage_model.transformer.text_model."] = ("text_encoder", "")
    return table


OPEN_CLIP = "cond_stage_model.model."
# SD 2.x's OpenCLIP text encoder, per layer: {OpenCLIP name: transformers name}.
OPEN_CLIP_LAYER_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                         "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
OPEN_CLIP_IGNORED = ("text_projection", "logit_scale")
# What a single file is, told by a key it holds: what we cannot run gets a message saying what it is.
OTHER_FAMILIES = [
    ("lora_unet_", "a LoRA: give it as loras=[(path, weight)] (hub run: --lora PATH:WEIGHT)"),
    ("lora_te_", "a LoRA: give it as loras=[(path, weight)] (hub run: --lora PATH:WEIGHT)"),
    ("conditioner.embedders.1.model.", "an SDXL checkpoint: SDXL is not supported (SD 1.x and 2.x are)"),
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint: SDXL is not supported (SD 1.x and 2.x are)"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint: not supported (SD 1.x and 2.x are)"),
    ("double_blocks.", "a FLUX checkpoint: not supported (SD 1.x and 2.x are)"),
    ("model.diffusion_model.double_blocks.", "a FLUX checkpoint: not supported (SD 1.x and 2.x are)"),
    ("emb_params", "a textual-inversion embedding: give it as embeddings=[path] (hub run: --embedding PATH)"),
]
# UNet input channels: 4 latents; 9 with an inpainting mask and masked picture; others are other models.
UNET_INPUTS = {4: "text-to-image", 9: "inpainting", 8: "InstructPix2Pix", 5: "depth-to-image"}


def checkpoint_family(state, where):
    """'sd1' or 'sd2' for a CompVis-layout Stable Diffusion file; anything else refused by what it is."""
    for marker, what in OTHER_FAMILIES:
        if any(key.startswith(marker) for key in state):
            raise CheckpointError(f"{where} is {what}")
    has_unet = any(key.startswith("model.diffusion_model.") for key in state)
    if not has_unet and any(key.startswith(("encoder.", "decoder.", "first_stage_model.")) for key in state):
        raise CheckpointError(f"{where} is a VAE alone: give it as vae=PATH (hub run: --vae PATH) beside a model")
    if not state:
        raise CheckpointError(f"{where} holds no weights at its top level (a textual-inversion .pt? give it as "
                              "embeddings=[path])")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and UNET_INPUTS.get(int(conv_in.shape[1])) not in ("text-to-image", "inpainting"):
        kind = UNET_INPUTS.get(int(conv_in.shape[1]), f"{conv_in.shape[1]}-channel")
        raise CheckpointError(f"{where} is a {kind} model (its UNet takes {conv_in.shape[1]} input channels): "
                              "not supported; text-to-image and inpainting models are")
    if any(key.startswith(OPEN_CLIP) for key in state):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in state):
        return "sd1"
    raise CheckpointError(f"{where} is not a Stable Diffusion 1.x/2.x checkpoint: it has no text encoder "
                          f"(cond_stage_model.) weights (first keys: {sorted(state)[:3]})")


def open_clip_text_encoder(state, layers, where):
    """SD 2.x's OpenCLIP text encoder weights under transformers' names (without `text_model.`): the
    attention's packed in_proj split into q, k and v; layers past the config's count dropped (SD 2.x
    files hold 24 and use the output of the 23rd, as diffusers' configs say)."""
    renamed = {"embeddings.token_embedding.weight": state[OPEN_CLIP + "token_embedding.weight"],
               "embeddings.position_embedding.weight": state[OPEN_CLIP + "positional_embedding"],
               "final_layer_norm.weight": state[OPEN_CLIP + "ln_final.weight"],
               "final_layer_norm.bias": state[OPEN_CLIP + "ln_final.bias"]}
    prefix = OPEN_CLIP + "transformer.resblocks."
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, part = key[len(prefix):].split(".", 1)
        if int(index) >= layers:
            continue
        target = f"encoder.layers.{index}."
        if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = part.rsplit("_", 1)[1]
            for name, third in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                renamed[f"{target}self_attn.{name}.{kind}"] = third
            continue
        module, kind = part.rsplit(".", 1)
        if module not in OPEN_CLIP_LAYER_PARTS:
            raise CheckpointError(f"{where}: unexpected OpenCLIP key {key}")
        renamed[f"{target}{OPEN_CLIP_LAYER_PARTS[module]}.{kind}"] = value
    return renamed


def split_compvis_state_dict(state, unet_config, vae_config, where, text_layers=None):
    """{component: state dict under diffusers' names}. SD 2.x's OpenCLIP text encoder needs
    `text_layers`, the config's layer count."""
    table = compvis_key_table(unet_config, vae_config)
    prefixes = sorted(table, key=len, reverse=True)
    parts = {component: {} for component in MODEL_CLASSES}
    if any(k.startswith(OPEN_CLIP) for k in state):
        parts["text_encoder"] = open_clip_text_encoder(state, text_layers, where)
    unknown = []
    for key, value in state.items():
        if COMPVIS_IGNORED_KEY.search(key) or key.startswith(OPEN_CLIP):
            if key.startswith(OPEN_CLIP) and not key[len(OPEN_CLIP):].startswith(
                    ("transformer.", "token_embedding.", "positional_embedding", "ln_final.") + OPEN_CLIP_IGNORED):
                unknown.append(key)
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
        raise CheckpointError(f"{where} has {len(unknown)} keys that are not part of a Stable Diffusion 1.x/2.x "
                              f"checkpoint (first: {sorted(unknown)[:3]}); is it a LoRA, a VAE alone, or "
                              "another model family?")
    return parts


def prediction_type_of(path, family, global_step, asked=None, inpainting=False):
    """What an SD 2.x UNet predicts, which its weights do not say: `asked`, else the config beside the
    file as A1111 reads it (`<name>.yaml` with `parameterization: "v"`), else diffusers' rule
    (epsilon for the 512 px base model's step count, 875,000, and for SD 2.x inpainting; v_prediction
    otherwise). SD 1.x: epsilon."""
    if asked is not None:
        return asked
    if family == "sd1":
        return "epsilon"
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8") as f:
            text = f.read()
        return "v_prediction" if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) else "epsilon"
    return "epsilon" if global_step == SD2_BASE_GLOBAL_STEP or inpainting else "v_prediction"


def load_single_file(path, dtype="float32", configs=None, skip_weights=(), prediction_type=None):
    """A CompVis-layout `.safetensors`/`.ckpt` of SD 1.x or 2.x; `configs` overrides the family's
    configs per component (SD v1.5's or SD 2.1's). `prediction_type` for SD 2.x: see prediction_type_of."""
    extras = {}
    state = read_state_dict(path, extras)
    family = checkpoint_family(state, path)
    given = configs or {}
    configs = {c: given.get(c) or default_config(c, family) for c in (*MODEL_CLASSES, "scheduler")}
    # An inpainting checkpoint (the community's "-inpainting" files) differs only in its UNet's input
    # channels: latents, mask and the masked picture's latents, 4 + 1 + 4.
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != configs["unet"].get("in_channels", 4):
        configs["unet"] = {**configs["unet"], "in_channels": int(conv_in.shape[1])}
    prediction = prediction_type_of(path, family, extras.get("global_step"), prediction_type,
                                    inpainting=configs["unet"].get("in_channels") == 9)
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction}
    if family == "sd2" and prediction == "epsilon" and not given.get("unet"):
        configs["unet"] = {**configs["unet"], "sample_size": 64}  # the 512 px base model
    text_layers = {**CLIP_DEFAULTS, **configs["text_encoder"]}["num_hidden_layers"]
    parts = split_compvis_state_dict(state, configs["unet"], configs["vae"], path, text_layers)
    models = {c: build_model(c, configs[c], None if c in skip_weights else parts[c], f"{path} ({c})", dtype)
              for c in MODEL_CLASSES}
    tokenizer = CLIPTokenizer.from_folder(pad_token=PAD_TOKENS[family])
    return StableDiffusionModels(tokenizer, scheduler_config=configs["scheduler"], source=path, **models)
