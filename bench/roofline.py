"""How close to this machine's arithmetic peak a guided UNet step and a VAE decode can get, in fp32.

Counts the floating-point operations of diffusers' SD v1.5 UNet (batch 2) and VAE decoder at each size
with PyTorch's FLOP counter, measures the fp32 matrix-product rate of this machine (a large matmul
through PyTorch, all cores), and prints their ratio: the least time any fp32 implementation that
does the same arithmetic needs here. Compare with bench.py's rows.

    .venv/bin/python bench/roofline.py --sizes 256 512
"""
import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import sd15_config


def matmul_gflops(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def counted_gflop(fn):
    """(diffusers' GFLOP, ours): our upsampling does 4 of the 9 multiply-adds per output pixel of
    diffusers' nearest x2 then 3x3 convolution (stable_diffusion/models/layers.py, Upsample2D)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    upsampling = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
                     if "upsamplers" in module and module.endswith(".conv"))
    total = counter.get_total_flops()
    return total / 1e9, (total - upsampling * 5 / 9) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(os.cpu_count())
    unet = UNet2DConditionModel(**sd15_config("unet")).eval()
    vae = AutoencoderKL(**sd15_config("vae")).eval()
    # The meta device: shapes and operation counts without the arithmetic.
    unet, vae = unet.to("meta"), vae.to("meta")
    rate = matmul_gflops()
    print(f"# {os.cpu_count()} CPU cores; fp32 matmul 2048^3 through PyTorch: {rate:.0f} GFLOP/s")
    print("| work | GFLOP, diffusers | GFLOP, ours | least seconds at that rate, diffusers | ours |")
    print("|---|---|---|---|---|")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="meta")
    for size in args.sizes:
        latents = torch.randn(2, 4, size // 8, size // 8, device="meta")
        rows = {f"guided UNet step, {size} px": counted_gflop(lambda: unet(latents, 500, context)),
                f"VAE decode, {size} px": counted_gflop(lambda: vae.decode(latents[:1]))}
        for work, (theirs, ours) in rows.items():
            print(f"| {work} | {theirs:.0f} | {ours:.0f} | {theirs / rate:.2f} | {ours / rate:.2f} |")


if __name__ == "__main__":
    main()
