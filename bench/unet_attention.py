"""What self-attention costs inside the whole UNet graph, ours as one operator (cpu_attention.py) and as
Paddle's matmuls and softmax: UNet graphs that differ only there, run in one process, taking turns
(bench/NOTES.md 25, 26). Then diffusers' UNet with and without its attention, in a process of its own.

    .venv/bin/python bench/unet_attention.py --weights /tmp/sdw --size 512 --runs 4

--weights: a diffusers folder (bench/bench.py writes random full-size ones when given none); each
variant's graph is exported once into --graphs (a temporary folder unless given), about 2 minutes each.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import PAUSE_S  # noqa: E402


def passed_through(q, k, v, heads, upcast=False, mask=None, query_chunks=1, kernel=None):
    """Attention's output replaced by its queries (k enters, so the graph keeps its context input)."""
    return q + k[:, :1] * 0


def ours(args):
    import paddle
    from paddle.static import InputSpec
    import stable_diffusion.cpu.compiled as compiled
    import stable_diffusion.models.layers as layers
    from stable_diffusion.cpu.compiled import CompiledLayer, UNetGraph
    from stable_diffusion.pipeline import cpu_threads
    from stable_diffusion.loading import load_models

    if compiled.attention_kernel(compiled.cache_root()) is None:
        raise SystemExit("the attention operator could not be built here (see the warning above)")
    # Applied in this order: each one holds for the graphs exported after it.
    variants = {"attention as one operator (kept)": lambda: None,
                "Paddle's matmuls and softmax": lambda: setattr(compiled, "attention_kernel", lambda root: None),
                "no attention (its queries passed through)": lambda: setattr(
                    layers, "scaled_dot_product_attention", passed_through)}
    paddle.set_grad_enabled(False)
    graphs = {}
    for index, (name, apply) in enumerate(variants.items()):
        folder = os.path.join(args.graphs, f"unet-{index}")
        models = load_models(args.weights, skip_weights=("unet",) if os.path.isdir(folder) else ())
        apply()
        spec = [InputSpec([None, 4, None, None], "float32", "sample"),
                InputSpec([None, models.unet.config["block_out_channels"][0]], "float32", "time_features"),
                InputSpec([None, None, models.unet.config["cross_attention_dim"]], "float32", "context")]
        graphs[name] = CompiledLayer(UNetGraph(models.unet), spec, folder, cpu_threads())
    rng = np.random.default_rng(0)
    latent = args.size // 8
    inputs = [rng.standard_normal(shape).astype(np.float32)
              for shape in [(2, 4, latent, latent), (1, 320), (2, 77, 768)]]
    for graph in graphs.values():
        graph(*inputs)  # oneDNN's one-off preparation at this size
    return interleaved(graphs, inputs, args.runs)


def diffusers_unet(args):
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(args.weights, subfolder="unet").eval()
    latent = args.size // 8
    inputs = [torch.randn(2, 4, latent, latent), 500, torch.randn(2, 77, 768)]
    attention = F.scaled_dot_product_attention

    def with_attention(real):
        def run(*inputs):
            F.scaled_dot_product_attention = attention if real else (lambda q, k, v, **kwargs: q)
            return unet(*inputs)
        return run
    runs = {"diffusers": with_attention(True), "diffusers, no attention (its queries passed through)":
            with_attention(False)}
    for run in runs.values():
        run(*inputs)
    return interleaved(runs, inputs, args.runs)


def interleaved(runs, inputs, count):
    """Each callable in turn, the order alternating: per callable, the median seconds and the median of
    the turns' ratios to the first callable's."""
    seconds = {name: [] for name in runs}
    for turn in range(count):
        for name in (list(runs) if turn % 2 == 0 else list(runs)[::-1]):
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            runs[name](*inputs)
            seconds[name].append(time.perf_counter() - start)
    first = seconds[next(iter(runs))]
    return {name: (statistics.median(values), statistics.median(v / f for v, f in zip(values, first)))
            for name, values in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--graphs", help="where to export the variants' graphs (default: a temporary folder)")
    parser.add_argument("--library", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        results = (ours if args.library == "ours" else diffusers_unet)(args)
        for name, (value, ratio) in results.items():
            print(f"@result {value:.3f} {ratio:.3f} {name}", flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="sd-attention-") as scratch:
        args.graphs = args.graphs or scratch
        print(f"# {' '.join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + sys.argv[1:])}")
        print(f"# guided UNet step (batch 2) at {args.size} px, {os.cpu_count()} CPU cores; median of {args.runs} "
              "runs, the variants of each library taking turns in one process")
        print("| UNet | s | to the first row of its library |")
        print("|---|---|---|")
        # One process per library: Paddle sets OMP_NUM_THREADS=1 on import, which PyTorch would obey.
        for library in ("ours", "diffusers"):
            output = subprocess.run([sys.executable, __file__, "--library", library, "--weights", args.weights,
                                     "--size", str(args.size), "--runs", str(args.runs), "--graphs", args.graphs],
                                    check=True, stdout=subprocess.PIPE, text=True).stdout
            for line in output.splitlines():
                if line.startswith("@result "):
                    _, value, ratio, name = line.split(" ", 3)
                    print(f"| {'ours, ' if library == 'ours' else ''}{name} | {value} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
