"""Speed and memory of this port against diffusers (PyTorch), side by side, on this machine.

Builds the full-size SD v1.5 architecture (text encoder, UNet, VAE) with random weights, saves them
once as a diffusers folder, then runs each library in its own process (so peak memory is its own),
loading that same folder. Prints a table of medians with the ratio ours/diffusers.

    .venv/bin/python bench/bench.py                      # 256 px rows, 512 px whole image with 2 steps
    .venv/bin/python bench/bench.py --sizes 256 --repeats 5
    python bench/bench.py --sizes 512 --steps 50 --fp16     # on a GPU: fp16 (our VAE stays fp32)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def sd15_config(component):
    """stable_diffusion/configs/<component>.json, read without importing Paddle (weights.default_config
    would): this process must not set OMP_NUM_THREADS, and a GPU machine may have diffusers alone."""
    with open(os.path.join(HERE, "..", "stable_diffusion", "configs", f"{component}.json")) as f:
        return json.load(f)


def make_weights(folder):
    """Random full-size SD v1.5 weights in the diffusers layout (what the Hub folder holds)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from reference import save_diffusers_folder

    torch.manual_seed(0)
    models = {"text_encoder": CLIPTextModel(CLIPTextConfig(**sd15_config("text_encoder"))),
              "unet": UNet2DConditionModel(**sd15_config("unet")),
              "vae": AutoencoderKL(**sd15_config("vae"))}
    save_diffusers_folder(models, folder)


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_graphs(folder, engine):
    """First use of a weights folder: trace and save the CPU graphs (once; cached afterwards).
    Prints whether they were cached already."""
    from stable_diffusion.compiled import unet_graph_cached
    from stable_diffusion.pipeline import StableDiffusionPipeline
    from stable_diffusion.weights import load_models
    cached = engine == "eager" or unet_graph_cached(folder)
    if not cached:
        StableDiffusionPipeline(load_models(folder), engine=engine)
    print(json.dumps({"cached": cached}))


def run_ours(folder, sizes, repeats, steps_by_size, engine, fp16):
    import paddle
    from stable_diffusion.compiled import unet_graph_cached
    from stable_diffusion.pipeline import StableDiffusionPipeline, select_device
    from stable_diffusion.weights import load_models
    device = select_device(use_gpu=True)
    if fp16 and device == "cpu":
        raise SystemExit("--fp16 needs a GPU: Paddle sees no CUDA device here (our CPU engine runs fp32)")
    engine = engine if device == "cpu" else "eager"
    dtype = "float16" if fp16 else "float32"
    start = time.perf_counter()
    skip = ("unet",) if engine == "inference" and unet_graph_cached(folder) else ()
    pipe = StableDiffusionPipeline(load_models(folder, dtype=dtype, skip_weights=skip), dtype=dtype, engine=engine)
    rows = {"load weights": time.perf_counter() - start}
    rows["text encoding (2 prompts)"] = timed(lambda: pipe.encode_text(["a photo of a cat", ""]).numpy(), repeats)
    context = pipe.encode_text(["a", ""])
    for size in sizes:
        latents = paddle.randn([2, 4, size // 8, size // 8]).astype(dtype)
        with paddle.no_grad():
            rows[f"guided UNet step, {size} px"] = timed(lambda: pipe.unet(latents, 500.0, context).numpy(),
                                                         repeats)
            rows[f"VAE decode, {size} px"] = timed(lambda: pipe.decode(latents[:1]), repeats)
            rows[f"preview frame (no VAE), {size} px"] = timed(lambda: pipe.preview(latents[:1]), repeats)
        steps = steps_by_size[size]
        rows[f"whole image, {size} px, {steps} steps"] = timed(
            lambda: pipe("a photo of a cat", "", size, size, 1, steps, 7.5, "ddim", 0.0, seed=0, progress=False),
            max(1, repeats // 2), warmup=0)
    if device == "gpu":
        return device, rows, paddle.device.cuda.max_memory_allocated() / 2**20
    return device, rows, peak_rss_mib()


def run_diffusers(folder, sizes, repeats, steps_by_size, engine, fp16):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if fp16 else torch.float32
    start = time.perf_counter()
    tokenizer = CLIPTokenizer(os.path.join(folder, "tokenizer", "vocab.json"),
                              os.path.join(folder, "tokenizer", "merges.txt"), model_max_length=77)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype), tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - start
    rows = {"load weights": load_seconds}
    with torch.no_grad():
        rows["text encoding (2 prompts)"] = timed(lambda: pipe.encode_prompt("a photo of a cat", device, 1, True, ""),
                                                  repeats)
        context = torch.cat(pipe.encode_prompt("a", device, 1, True, "")[::-1])
        for size in sizes:
            latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
            rows[f"guided UNet step, {size} px"] = timed(lambda: pipe.unet(latents, 500, context).sample.cpu(), repeats)
            rows[f"VAE decode, {size} px"] = timed(
                lambda: pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor).sample.cpu(), repeats)
            steps = steps_by_size[size]
            rows[f"whole image, {size} px, {steps} steps"] = timed(
                lambda: pipe("a photo of a cat", height=size, width=size, num_inference_steps=steps,
                             output_type="np"), max(1, repeats // 2), warmup=0)
    if device == "cuda":
        return device, rows, torch.cuda.max_memory_allocated() / 2**20
    return device, rows, peak_rss_mib()


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 2], help="whole-image steps, one per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", help="a diffusers folder to reuse (default: random weights in a temp dir)")
    parser.add_argument("--engine", choices=["inference", "eager"], default="inference",
                        help="our CPU engine (see stable_diffusion/pipeline.py)")
    parser.add_argument("--fp16", action="store_true", help="half precision on a GPU (diffusers: all of it; ours: "
                        "the text encoder and UNet, the VAE in fp32)")
    parser.add_argument("--only", choices=["ours", "diffusers"], help="time one library (no ratios)")
    parser.add_argument("--library", choices=["ours", "diffusers", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps_by_size = dict(zip(args.sizes, args.steps + [args.steps[-1]] * len(args.sizes)))

    if args.library == "export":
        return export_graphs(args.weights, args.engine)
    if args.library:
        runner = run_ours if args.library == "ours" else run_diffusers
        device, rows, peak_mib = runner(args.weights, args.sizes, args.repeats, steps_by_size, args.engine, args.fp16)
        print(json.dumps({"device": device, "rows": rows, "peak_mib": peak_mib}))
        return

    libraries = [args.only] if args.only else ["diffusers", "ours"]
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as scratch:
        folder = args.weights or os.path.join(scratch, "weights")
        if not args.weights:
            make_weights(folder)
        results = {}
        # Graphs are exported in a process of their own, so that the rows and the peak memory below
        # are those of every later run; the export is a one-off, shown on its own line.
        # Paddle is never imported here: importing it sets OMP_NUM_THREADS=1, which the processes
        # started below would inherit (PyTorch would then run on one core).
        cached, export_seconds = True, 0.0
        if "ours" in libraries:
            start = time.perf_counter()
            output = subprocess.run([sys.executable, __file__, "--library", "export", "--weights", folder,
                                     "--engine", args.engine], check=True, capture_output=True, text=True).stdout
            cached = json.loads(output.strip().splitlines()[-1])["cached"]
            export_seconds = time.perf_counter() - start
        for library in libraries:
            command = [sys.executable, __file__, "--library", library, "--weights", folder, "--repeats",
                       str(args.repeats), "--sizes", *map(str, args.sizes), "--steps", *map(str, args.steps),
                       "--engine", args.engine] + (["--fp16"] if args.fp16 else [])
            output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[library] = json.loads(output.strip().splitlines()[-1])
    results = {library: results[library] for library in ("ours", "diffusers") if library in results}
    print_table(args, results, cached, export_seconds)


def print_table(args, results, cached, export_seconds):
    devices = ", ".join(f"{library} {result['device']}" for library, result in results.items())
    print(f"# {' '.join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + sys.argv[1:])}")
    print(f"# device: {devices} ({'fp16' if args.fp16 else 'fp32'}; our engine on CPU: {args.engine}); "
          f"{os.cpu_count()} CPU cores; median of {args.repeats} after a warm-up "
          f"(whole image: {max(1, args.repeats // 2)} runs)")
    if "ours" in results:
        print("# ours: CPU graphs already cached" if cached else
              f"# ours, first use of these weights: {export_seconds:.0f} s to load them and export the CPU "
              "graphs (once)")
    on_gpu = any(result["device"] != "cpu" for result in results.values())
    memory_row = "peak GPU memory, allocator (MiB)" if on_gpu else "peak RSS (MiB)"
    columns = [f"{library} (s)" for library in results]
    both = len(results) == 2
    print("| " + " | ".join([f"{'row':<44}"] + [f"{c:>13}" for c in columns] +
                            ([f"{'ours/diffusers':>14}"] if both else [])) + " |")
    print("|" + "|".join(["-" * 46] + ["-" * 15] * len(columns) + (["-" * 16] if both else [])) + "|")
    rows = next(iter(results.values()))["rows"]
    for row in list(rows) + [memory_row]:
        values = [result["peak_mib"] if row == memory_row else result["rows"].get(row)  # diffusers has no preview
                  for result in results.values()]
        cells = [f"{'-':>13}" if v is None else f"{v:>13.0f}" if row == memory_row else f"{v:>13.3f}"
                 for v in values]
        if both:
            cells.append(f"{values[0] / values[1]:>14.2f}" if None not in values else f"{'-':>14}")
        print("| " + " | ".join([f"{row:<44}"] + cells) + " |")


if __name__ == "__main__":
    main()
