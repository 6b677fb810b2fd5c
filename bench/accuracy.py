"""How far our CPU graphs' outputs are from diffusers' at full size: the same weights and the same
inputs through the text encoder, one guided UNet step and a VAE decode, at one image size. The unit
tests check the same at tiny sizes; this shows what full-size layers add (longer sums, deeper nets).

    .venv/bin/python bench/accuracy.py --weights /tmp/sdw --size 512

--weights: a diffusers folder (bench/bench.py writes one with random full-size weights); our graphs
are exported first if they are not cached yet. Threads are not the point here: Paddle's import leaves
PyTorch one thread.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def ours(folder, inputs):
    import paddle
    from stable_diffusion.pipeline import StableDiffusionPipeline, select_device
    from stable_diffusion.loading import load_models
    select_device(use_gpu=False)
    pipe = StableDiffusionPipeline(load_models(folder), engine="inference")
    token_embeds = pipe.models.text_encoder.embed_tokens(paddle.to_tensor(inputs["ids"]))
    return {"text encoder": pipe.text_encoder(token_embeds)[-1].numpy(),
            "guided UNet step": pipe.unet(paddle.to_tensor(inputs["sample"]), 500.0,
                                          paddle.to_tensor(inputs["context"])).numpy(),
            "VAE decode": pipe.vae_decode(paddle.to_tensor(inputs["latents"])).numpy()}


def diffusers(folder, inputs):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    with torch.no_grad():
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        return {"text encoder": text_encoder(torch.from_numpy(inputs["ids"]))[0].numpy(),
                "guided UNet step": unet(torch.from_numpy(inputs["sample"]), 500,
                                         torch.from_numpy(inputs["context"])).sample.numpy(),
                "VAE decode": vae.decode(torch.from_numpy(inputs["latents"])).sample.numpy()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    latent = args.size // 8
    inputs = {"ids": rng.integers(0, 49408, (2, 77)),
              "sample": rng.standard_normal((2, 4, latent, latent)).astype(np.float32),
              "context": rng.standard_normal((2, 77, 768)).astype(np.float32),
              # Latents of SD's scale, divided by the VAE's scaling factor as the pipeline does.
              "latents": (rng.standard_normal((1, 4, latent, latent)) / 0.18215).astype(np.float32)}
    got, want = ours(args.weights, inputs), diffusers(args.weights, inputs)
    print(f"# {' '.join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + sys.argv[1:])}")
    print(f"# image size {args.size} px")
    print("| output | largest value, diffusers | largest difference | relative to the largest value |")
    print("|---|---|---|---|")
    for name in got:
        difference, scale = np.abs(got[name] - want[name]).max(), np.abs(want[name]).max()
        print(f"| {name} | {scale:.4g} | {difference:.3g} | {difference / scale:.2g} |")


if __name__ == "__main__":
    main()
