"""One CompVis-layout `.safetensors`/`.ckpt` file, as community SD 1.x models ship them: its keys are
renamed to diffusers' by `compvis_key_table`, then loaded by name like a folder."""
import re

from stable_diffusion.loading.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.loading.state_dict import MODEL_CLASSES, StableDiffusionModels, build_model, default_config
from stable_diffusion.models.unet import UNET_DEFAULTS
from stable_diffusion.models.vae import VAE_DEFAULTS
from stable_diffusion.tokenizer import CLIPTokenizer

COMPVIS_IGNORED_KEY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights$|logvar$"
    r"|first_stage_model\.loss\.|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")


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
    # An inpainting checkpoint (the community's "-inpainting" files) differs only in its UNet's input
    # channels: latents, mask and the masked picture's latents, 4 + 1 + 4.
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != configs["unet"].get("in_channels", 4):
        configs["unet"] = {**configs["unet"], "in_channels": int(conv_in.shape[1])}
    parts = split_compvis_state_dict(state, configs["unet"], configs["vae"], path)
    models = {c: build_model(c, configs[c], None if c in skip_weights else parts[c], f"{path} ({c})", dtype)
              for c in MODEL_CLASSES}
    return StableDiffusionModels(CLIPTokenizer.from_folder(), scheduler_config=configs["scheduler"],
                                 source=path, **models)
