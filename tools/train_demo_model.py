"""Train the demo model shipped in stable_diffusion/demo_model/: Stable Diffusion's architecture, small,
on Noto Color Emoji rendered at 64x64 px and captioned with their Unicode names.

    apt-get install fonts-noto-color-emoji
    .venv/bin/python tools/train_demo_model.py --out stable_diffusion/demo_model

Training is not run time, so it uses the test reference (torch + diffusers + transformers from
requirements-dev.txt). Seeded; on a 2-core CPU it takes about the time its README section gives.
Stages: render the data, train the VAE (pixels <-> 16x16x4 latents), then the text encoder and UNet
together on the VAE's latents (epsilon prediction, SD's noise schedule, captions dropped 10% of the
time for classifier-free guidance). The folder is written after each stage's checkpoints, atomically.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
import unicodedata

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the one size the font's colour bitmaps come in
SIZE = 64  # native image size of the demo model
# Not pictures of their own: joiners, variation selectors, keycap and tag parts, skin-tone swatches,
# regional-indicator letters (flags are pairs of them).
SKIPPED = {0x200D, 0x20E3, 0xFE0F, *range(0xE0020, 0xE0080), *range(0x1F3FB, 0x1F400), *range(0x1F1E6, 0x1F200)}

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 128],
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  layers_per_block=1, norm_num_groups=32, sample_size=SIZE)
UNET_CONFIG = dict(sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=[32, 64, 128],
                   down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                   cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                    "timestep_spacing": "leading", "trained_betas": None}


def emoji_characters(font_path=FONT):
    """Every single code point the font draws that has a Unicode name, minus the parts in SKIPPED."""
    from fontTools.ttLib import TTFont
    cmap = TTFont(font_path).getBestCmap()
    chars = []
    for cp in sorted(cmap):
        if cp < 0xA9 or cp in SKIPPED:
            continue
        name = unicodedata.name(chr(cp), None)
        if name:
            chars.append(chr(cp))
    return chars


def render(char, font):
    """One emoji on white, its drawn part centred and scaled to fill SIZE x SIZE px."""
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((10, 10), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    part = canvas.crop(box)
    side = max(part.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(part, ((side - part.size[0]) // 2, (side - part.size[1]) // 2))
    return square.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)


def render_dataset(font_path=FONT):
    font = ImageFont.truetype(font_path, FONT_SIZE)
    names, images = [], []
    for char in emoji_characters(font_path):
        image = render(char, font)
        if image is not None:
            names.append(unicodedata.name(char).lower())
            images.append(np.asarray(image))
    return names, np.stack(images)


def caption(name, rng):
    """The Unicode name most of the time; sometimes phrased; empty 10% of the time (for guidance)."""
    roll = rng.random()
    if roll < 0.10:
        return ""
    if roll < 0.25:
        return f"an emoji of {name}"
    if roll < 0.32:
        return f"{name} emoji"
    return name


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(pixels, steps, batch, log):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = pixels[torch.randint(len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} mse {mse.item():.5f}")
    return vae.eval()


def tokenize(tokenizer, texts):
    return torch.tensor([tokenizer(t) for t in texts], dtype=torch.long)


def train_denoiser(latents, names, tokenizer, steps, batch, learning_rate, log, save, resume=None):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if resume:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(resume, "unet"), torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(resume, "text_encoder"), torch_dtype=torch.float32)
        log(f"resumed the text encoder and UNet from {resume}")
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet.train()
    text_encoder.train()
    alphas = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    # An exponential moving average of the weights is what gets shipped: it samples cleaner than the
    # last step's weights after a short run.
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(3)
    running = None
    start = time.time()
    for step in range(1, steps + 1):
        index = torch.randint(len(latents), (batch,), generator=generator)
        mean, std = latents[index].chunk(2, dim=1)
        x0 = mean + std * torch.randn(mean.shape, generator=generator)
        # Offset noise: lets the model move the whole image's mean (mostly white backgrounds).
        noise = torch.randn(x0.shape, generator=generator) + 0.1 * torch.randn(
            (batch, x0.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ids = tokenize(tokenizer, [caption(names[i], rng) for i in index.tolist()])
        context = text_encoder(ids).last_hidden_state
        prediction = unet(noisy, t, context).sample
        # Min-SNR weighting (gamma 5, Hang et al. 2023): faster convergence for epsilon prediction.
        snr = a / (1 - a)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * (prediction - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} running {running:.4f} "
                f"({(time.time() - start) / step:.2f} s/step)")
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                current = [p.detach().clone() for p in params]
                for p, average in zip(params, ema):
                    p.copy_(average)
                save(unet, text_encoder, step, running)
                for p, value in zip(params, current):
                    p.copy_(value)
    return running


def write_folder(out, vae, unet, text_encoder, scaling_factor, meta, resumed_from=None):
    """The diffusers model folder, written beside `out` and renamed into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo_model.", dir=parent)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(os.path.join(tmp, "vae"))
    unet.save_pretrained(os.path.join(tmp, "unet"))
    text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
    for component in ("vae", "unet", "text_encoder"):
        # A resumed model's config records the folder it came from: not the shipped folder's business.
        config_path = os.path.join(tmp, component, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        # fp16 halves the folder (the text encoder's 49408-token table is most of it); loaders cast
        # to the dtype they run in.
        from safetensors.torch import load_file, save_file
        folder = os.path.join(tmp, component)
        name = next(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        tensors = {k: v.half().contiguous() for k, v in load_file(os.path.join(folder, name)).items()}
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    tokenizer_dir = os.path.join(tmp, "tokenizer")
    os.makedirs(tokenizer_dir)
    vocab = os.path.join(REPO, "stable_diffusion", "clip_vocab")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(vocab, name), tokenizer_dir)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
                   "feature_extractor": [None, None], "requires_safety_checker": False}, f, indent=2)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for name in ("LICENSE.md", "README.md", "generation_defaults.json"):  # the shipped folder's own
        for folder in (out, resumed_from):
            if folder and os.path.isfile(os.path.join(folder, name)):
                shutil.copy(os.path.join(folder, name), tmp)
                break
    old = out + ".old"
    if os.path.isdir(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "stable_diffusion", "demo_model"))
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--vae_batch", type=int, default=16)
    parser.add_argument("--unet_steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--resume", default=None,
                        help="a demo model folder: train on from its VAE, text encoder and UNet (the run's "
                             "steps, time and loss are added to its training.json history)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message):
        print(f"[{(time.time() - start) / 60:6.1f} min] {message}", flush=True)

    names, images = render_dataset()
    log(f"rendered {len(names)} emoji at {SIZE}x{SIZE} px")
    pixels = to_tensor(images)
    # The VAE stage is kept beside the output, so that a rerun with the same settings resumes after it.
    vae_cache = f"{args.out}.vae-{args.vae_steps}-{args.vae_batch}.pt"
    if args.resume:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(os.path.join(args.resume, "vae"), torch_dtype=torch.float32).eval()
        log(f"vae: reused {args.resume}")
    elif os.path.isfile(vae_cache):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**VAE_CONFIG)
        vae.load_state_dict(torch.load(vae_cache))
        vae.eval()
        log(f"vae: reused {vae_cache}")
    else:
        vae = train_vae(pixels, args.vae_steps, args.vae_batch, log)
        torch.save(vae.state_dict(), vae_cache + ".partial")
        os.replace(vae_cache + ".partial", vae_cache)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mean, std = posterior.mean, posterior.std
        reconstruction = vae.decode(mean).sample
        vae_mse = torch.nn.functional.mse_loss(reconstruction, pixels).item()
    # A resumed run keeps the latent scale its UNet was trained on.
    scaling_factor = vae.config.scaling_factor if args.resume else float(1 / mean.std())
    log(f"vae: reconstruction mse {vae_mse:.5f} on the whole set; latent std {1 / scaling_factor:.4f}")
    latents = torch.cat([mean, std], dim=1) * scaling_factor

    import sys
    sys.path.insert(0, REPO)
    from stable_diffusion.tokenizer import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_folder()

    history = []
    if args.resume:
        with open(os.path.join(args.resume, "training.json")) as f:
            earlier = json.load(f)
        history = earlier.pop("history", []) + [earlier]

    def save(unet, text_encoder, step, loss):
        meta = {"command": "python tools/train_demo_model.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "threads") and v is not None),
                "images": len(names), "vae_steps": args.vae_steps, "vae_reconstruction_mse": round(vae_mse, 5),
                "unet_steps_done": step, "unet_steps": args.unet_steps, "batch": args.batch,
                "final_running_loss": round(loss, 5), "minutes": round((time.time() - start) / 60, 1),
                "threads": args.threads, "torch": torch.__version__}
        if history:
            meta["history"] = history
            meta["minutes_in_all"] = round(meta["minutes"] + sum(run["minutes"] for run in history), 1)
        write_folder(args.out, vae, unet, text_encoder, scaling_factor, meta, args.resume)
        log(f"saved {args.out} at step {step}")

    train_denoiser(latents, names, tokenizer, args.unet_steps, args.batch, args.learning_rate, log, save,
                   resume=args.resume)
    log("done")


if __name__ == "__main__":
    main()
