"""Tiny Stable Diffusion checkpoints made with the PyTorch reference (diffusers + transformers),
saved in the real layouts: a diffusers model folder and a CompVis single file."""
import json
import os
import shutil

import numpy as np
import torch

VOCAB_DIR = os.path.join(os.path.dirname(__file__), "..", "stable_diffusion", "clip_vocab")

TINY = {
    "sd1": dict(
        text_encoder=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[32, 64, 64], norm_num_groups=8, cross_attention_dim=32,
                  attention_head_dim=4,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 64],
                 layers_per_block=2, norm_num_groups=8, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3),
    ),
    "sd2": dict(
        text_encoder=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"),
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[32, 64, 64], norm_num_groups=8, cross_attention_dim=48,
                  attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64],
                 layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.13025,
                 down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3),
    ),
}
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon", "clip_sample": False}


def perturb(model, seed):
    """Move every parameter off its initial value, so a dropped bias or norm weight changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def build_reference(kind, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = TINY[kind]
    torch.manual_seed(seed)
    return {
        "text_encoder": perturb(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), seed + 1),
        "unet": perturb(UNet2DConditionModel(**cfg["unet"]), seed + 2),
        "vae": perturb(AutoencoderKL(**cfg["vae"]), seed + 3),
    }


def save_diffusers_folder(models, folder):
    for name, model in models.items():
        model.save_pretrained(os.path.join(folder, name), safe_serialization=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    tokenizer_dir = os.path.join(folder, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(VOCAB_DIR, name), tokenizer_dir)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


def compvis_state_dict(models):
    """The reference weights under CompVis keys: our key table read backwards. The test that uses this
    checks it against diffusers' own CompVis converter, so the table is not checked against itself."""
    from stable_diffusion.loading.single_file import compvis_key_table
    table = compvis_key_table(dict(models["unet"].config), dict(models["vae"].config))
    backwards = {(component, target): source for source, (component, target) in table.items()}
    state = {}
    for component, model in models.items():
        targets = sorted((t for c, t in backwards if c == component), key=len, reverse=True)
        for key, value in model.state_dict().items():
            if key.endswith("position_ids"):
                continue
            key = key[len("text_model."):] if key.startswith("text_model.") else key
            target = next(t for t in targets if key.startswith(t))
            compvis_key = backwards[(component, target)] + key[len(target):]
            if component == "vae" and ".attentions." in key and value.ndim == 2:
                value = value[:, :, None, None]  # CompVis VAE attention uses 1x1 convolutions
            state[compvis_key] = value.detach().clone().contiguous()
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    return state


def to_numpy(t):
    return t.detach().float().numpy()


def max_relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / (np.abs(reference).max() + 1e-12))
