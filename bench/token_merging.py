"""Does token merging (ToMe, ratio 0.5, tomesd's defaults) make a CPU step faster? Ours with and without
it, and diffusers with and without the tomesd package, on full-size SD v1.5 weights (random, as bench.py
makes them): a guided UNet step at the given size, and ours a whole image with the fast preset. Each
library runs in a process of its own; within it the variants take turns, and the ratio column is the
median of the turns' ratios (this machine drifts by 10-30% within minutes).

    .venv/bin/python bench/token_merging.py --weights DIR [--size 512] [--turns 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
RATIO = 0.5


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(folder, size):
    import numpy as np
    import paddle
    from stable_diffusion.options import FAST_PRESET
    from stable_diffusion.pipeline import StableDiffusionPipeline
    paddle.set_grad_enabled(False)
    plain = StableDiffusionPipeline.load(folder)
    merging = StableDiffusionPipeline.load(folder, token_merging=RATIO)
    latents = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 4, size // 8, size // 8)), "float32")
    context = plain.encode_text(["a", ""])
    image = dict(height=size, width=size, guidance_scale=7.5, seed=0, progress=False, **FAST_PRESET)
    return {
        "guided UNet step": {"off": lambda: plain.unet(latents, 500.0, context).numpy(),
                             "on": lambda: merging.unet(latents, 500.0, context).numpy()},
        f"whole image, --fast ({FAST_PRESET['num_inference_steps']} steps)": {
            "off": lambda: plain("a photo of a cat", **image), "on": lambda: merging("a photo of a cat", **image)},
    }


def diffusers(folder, size):
    import torch
    import tomesd
    from diffusers import UNet2DConditionModel
    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def step(ratio):
        def run():
            tomesd.remove_patch(unet)
            if ratio:
                tomesd.apply_patch(unet, ratio=ratio)
            return unet(latents, 500, context).sample
        return run
    return {"guided UNet step": {"off": step(0.0), "on": step(RATIO)}}


def worker(library, folder, size, turns):
    rows = (ours if library == "ours" else diffusers)(folder, size)
    results = {}
    for row, variants in rows.items():
        for fn in variants.values():  # warm-up: first-use costs (oneDNN's weight copies) are not the step's
            fn()
        seconds = {name: [] for name in variants}
        for turn in range(turns):
            order = list(variants) if turn % 2 == 0 else list(variants)[::-1]
            for name in order:
                seconds[name].append(timed(variants[name]))
        results[row] = seconds
    print("@result " + json.dumps(results), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a full-size SD v1.5 diffusers folder (default: random weights written "
                                          "to a temp folder, 4 GB)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--library", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        return worker(args.library, args.weights, args.size, args.turns)
    folder = args.weights
    if folder is None:
        from bench import make_weights
        folder = tempfile.mkdtemp(prefix="sd15-random-")
        make_weights(folder)
    print(f"token merging ratio {RATIO}, {args.size} px, {args.turns} turns, seconds are medians")
    print(f"| library | row | without (s) | with (s) | with/without |\n|---|---|---|---|---|")
    for library in ("ours", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--library", library, "--weights", folder, "--size",
                              str(args.size), "--turns", str(args.turns)], capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("@result ")), None)
        if line is None:
            raise SystemExit(f"{library} failed:\n{out.stderr[-3000:]}")
        for row, seconds in json.loads(line[len("@result "):]).items():
            ratio = statistics.median(on / off for on, off in zip(seconds["on"], seconds["off"]))
            print(f"| {library} | {row} | {statistics.median(seconds['off']):.2f} | "
                  f"{statistics.median(seconds['on']):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
