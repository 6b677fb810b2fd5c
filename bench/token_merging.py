"""Does token merging (ToMe, ratio 0.5, tomesd's defaults) make a CPU step faster? A guided UNet step
(batch 2) at each size, ours with and without it, and diffusers with and without the tomesd package,
on full-size SD v1.5 weights (random, as bench.py makes them). Each library runs in a process of its
own. Ours loads one pipeline at a time (two loaded side by side pushed the machine's page cache out
and read 17 s a step instead of 9.7); diffusers patches and unpatches one UNet. The variants take
turns, each timed after a warm-up run, and the ratio column is the median of the turns' ratios (this
machine drifts by 10-30% within minutes).

    .venv/bin/python bench/token_merging.py --weights DIR [--sizes 512 768] [--turns 3]
"""
import argparse
import gc
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


def ours(folder, size, ratio):
    """Seconds of a warm guided UNet step, our pipeline loaded for this ratio alone."""
    import numpy as np
    import paddle
    from stable_diffusion.pipeline import StableDiffusionPipeline
    paddle.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.load(folder, token_merging=ratio)
    latents = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 4, size // 8, size // 8)), "float32")
    context = pipe.encode_text(["a", ""])
    step = lambda: pipe.unet(latents, 500.0, context).numpy()  # noqa: E731
    step()
    seconds = timed(step)
    del pipe, step
    gc.collect()
    return seconds


def diffusers(folder):
    import torch
    import tomesd
    from diffusers import UNet2DConditionModel
    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def run(size, ratio):
        latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        tomesd.remove_patch(unet)
        if ratio:
            tomesd.apply_patch(unet, ratio=ratio)
        step = lambda: unet(latents, 500, context).sample  # noqa: E731
        step()
        return timed(step)
    return run


def worker(library, folder, sizes, turns):
    run = (lambda size, ratio: ours(folder, size, ratio)) if library == "ours" else diffusers(folder)
    results = {}
    for size in sizes:
        seconds = {"off": [], "on": []}
        for turn in range(turns):
            for name in (["off", "on"] if turn % 2 == 0 else ["on", "off"]):
                seconds[name].append(run(size, RATIO if name == "on" else 0.0))
        results[f"guided UNet step, {size} px"] = seconds
    print("@result " + json.dumps(results), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a full-size SD v1.5 diffusers folder (default: random weights written "
                                          "to a temp folder, 4 GB)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--library", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        return worker(args.library, args.weights, args.sizes, args.turns)
    folder = args.weights
    if folder is None:
        from bench import make_weights
        folder = tempfile.mkdtemp(prefix="sd15-random-")
        make_weights(folder)
    print(f"token merging ratio {RATIO}, {args.turns} turns, seconds are medians")
    print(f"| library | row | without (s) | with (s) | with/without |\n|---|---|---|---|---|")
    for library in ("ours", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--library", library, "--weights", folder, "--sizes",
                              *map(str, args.sizes), "--turns", str(args.turns)], capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("@result ")), None)
        if line is None:
            raise SystemExit(f"{library} failed:\n{out.stderr[-3000:]}")
        for row, seconds in json.loads(line[len("@result "):]).items():
            ratio = statistics.median(on / off for on, off in zip(seconds["on"], seconds["off"]))
            print(f"| {library} | {row} | {statistics.median(seconds['off']):.2f} | "
                  f"{statistics.median(seconds['on']):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
