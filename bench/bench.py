"""Speed and memory of this port against diffusers (PyTorch), side by side, on this machine.

Builds the full-size SD v1.5 architecture (text encoder, UNet, VAE) with random weights, saves them
once as a diffusers folder, then loads it into each library in a process of its own (so peak memory is
its own); the two take turns, row by row and run by run, so that the machine's drifts in speed reach
both alike. Prints a table of medians with the ratio ours/diffusers (the median of the turns' ratios).

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

import numpy


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from stable_diffusion.options import FAST_PRESET as FAST  # noqa: E402 (imports no Paddle: this process sets no threads)


def sd15_config(component):
    """stable_diffusion/loading/configs/<component>.json, read without importing Paddle (its default_config
    would): this process must not set OMP_NUM_THREADS, and a GPU machine may have diffusers alone."""
    with open(os.path.join(HERE, "..", "stable_diffusion", "loading", "configs", f"{component}.json")) as f:
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
    from stable_diffusion.pipeline import StableDiffusionPipeline
    cached = engine == "eager" or StableDiffusionPipeline.cpu_graphs_saved(folder)
    if not cached:
        StableDiffusionPipeline.load(folder, engine=engine)
    print(json.dumps({"cached": cached}))


def init_image(size):
    """The picture the image-to-image rows start from: a smooth colour gradient, the same for both."""
    ramp = numpy.linspace(0, 255, size, dtype=numpy.float32)
    return numpy.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                        numpy.full((size, size), 128.0, numpy.float32)], axis=-1).astype(numpy.uint8)


def image_to_image_row(size, steps):
    """Strength 0.5 of 2 x steps: the same number of UNet steps as the whole-image row, plus the VAE
    encoder, so the two rows' difference is what an image-to-image call costs more."""
    return f"image-to-image, {size} px, {2 * steps} steps x strength 0.5"


def fast_row(size):
    return (f"whole image, {size} px, --fast ({FAST['sampler']} {FAST['num_inference_steps']} steps, DeepCache "
            f"every {FAST['deep_cache_interval']})")


def ours_rows(folder, sizes, steps_by_size, engine, fp16):
    """(device, seconds to load, {row: (callable, warm up first)}, peak memory in MiB as a callable)"""
    import paddle
    from stable_diffusion.images import to_model_range
    from stable_diffusion.pipeline import StableDiffusionPipeline, select_device
    device = select_device(use_gpu=True)
    if fp16 and device == "cpu":
        raise SystemExit("--fp16 needs a GPU: Paddle sees no CUDA device here (our CPU engine runs fp32)")
    dtype = "float16" if fp16 else "float32"
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.load(folder, device=device, dtype=dtype, engine=engine)
    load_seconds = time.perf_counter() - start
    paddle.set_grad_enabled(False)
    rows = {"text encoding (2 prompts)": (lambda: pipe.encode_text(["a photo of a cat", ""]).numpy(), True)}
    context = pipe.encode_text(["a", ""])
    for size in sizes:
        latents = paddle.randn([2, 4, size // 8, size // 8]).astype(dtype)
        steps = steps_by_size[size]
        rows.update({
            f"guided UNet step, {size} px": (lambda latents=latents: pipe.unet(latents, 500.0, context).numpy(), True),
            f"VAE decode, {size} px": (lambda latents=latents: pipe.decode(latents[:1]), True),
            f"preview frame (no VAE), {size} px": (lambda latents=latents: pipe.preview(latents[:1]), True),
            f"whole image, {size} px, {steps} steps": (lambda size=size, steps=steps: pipe(
                "a photo of a cat", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                sampler="ddim", seed=0, progress=False), False),
            f"VAE encode, {size} px": (lambda size=size: pipe.encode_image(
                to_model_range(init_image(size)), numpy.random.default_rng(0)).numpy(), True),
            image_to_image_row(size, steps): (lambda size=size, steps=steps: pipe(
                "a photo of a cat", height=size, width=size, num_inference_steps=2 * steps, guidance_scale=7.5,
                sampler="ddim", seed=0, progress=False, init_image=init_image(size), strength=0.5), False),
            fast_row(size): (lambda size=size: pipe("a photo of a cat", height=size, width=size, guidance_scale=7.5,
                                                    seed=0, progress=False, **FAST), False)})
    if device == "gpu":
        return device, load_seconds, rows, lambda: paddle.device.cuda.max_memory_allocated() / 2**20
    return device, load_seconds, rows, peak_rss_mib


def diffusers_rows(folder, sizes, steps_by_size, engine, fp16):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
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
    image_to_image = StableDiffusionImg2ImgPipeline(**pipe.components)
    image_to_image.set_progress_bar_config(disable=True)
    from diffusers import UniPCMultistepScheduler
    fast_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": UniPCMultistepScheduler.from_config(
        pipe.scheduler.config)})
    fast_pipe.set_progress_bar_config(disable=True)

    def fast_image(size):
        """UniPC with the DeepCache package's helper, enabled for this call only (it wraps the shared UNet)."""
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=fast_pipe)
        helper.set_params(cache_interval=FAST["deep_cache_interval"], cache_branch_id=0)
        helper.enable()
        try:
            return fast_pipe("a photo of a cat", height=size, width=size,
                             num_inference_steps=FAST["num_inference_steps"], output_type="np")
        finally:
            helper.disable()
    load_seconds = time.perf_counter() - start
    torch.set_grad_enabled(False)
    rows = {"text encoding (2 prompts)": (lambda: pipe.encode_prompt("a photo of a cat", device, 1, True, ""), True)}
    context = torch.cat(pipe.encode_prompt("a", device, 1, True, "")[::-1])
    for size in sizes:
        latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
        steps = steps_by_size[size]
        rows.update({
            f"guided UNet step, {size} px": (lambda latents=latents: pipe.unet(latents, 500, context).sample.cpu(), True),
            f"VAE decode, {size} px": (lambda latents=latents: pipe.vae.decode(
                latents[:1] / pipe.vae.config.scaling_factor).sample.cpu(), True),
            f"whole image, {size} px, {steps} steps": (lambda size=size, steps=steps: pipe(
                "a photo of a cat", height=size, width=size, num_inference_steps=steps, output_type="np"), False),
            f"VAE encode, {size} px": (lambda size=size: pipe.vae.encode(torch.from_numpy(
                init_image(size)).permute(2, 0, 1)[None].to(device, dtype) / 127.5 - 1).latent_dist.sample().cpu(),
                True),
            image_to_image_row(size, steps): (lambda size=size, steps=steps: image_to_image(
                "a photo of a cat", image=init_image(size), num_inference_steps=2 * steps, strength=0.5,
                output_type="np"), False),
            fast_row(size): (lambda size=size: fast_image(size), False)})
    if device == "cuda":
        return device, load_seconds, rows, lambda: torch.cuda.max_memory_allocated() / 2**20
    return device, load_seconds, rows, peak_rss_mib


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


REPLY = "@bench "  # marks the worker's replies among whatever the libraries print


def serve(library, args, steps_by_size):
    """A worker: loads one library, then runs the row named on each line of stdin once and replies
    with its seconds; "peak" replies with the peak memory so far."""
    setup = ours_rows if library == "ours" else diffusers_rows
    device, load_seconds, rows, peak_mib = setup(args.weights, args.sizes, steps_by_size, args.engine, args.fp16)

    def reply(message):
        print(REPLY + json.dumps(message), flush=True)

    reply({"device": device, "load": load_seconds, "rows": {name: warm for name, (_, warm) in rows.items()}})
    for line in sys.stdin:
        name = line.strip()
        if name == "peak":
            reply({"peak_mib": peak_mib()})
            continue
        start = time.perf_counter()
        rows[name][0]()
        reply({"seconds": time.perf_counter() - start})


class Worker:
    def __init__(self, library, args):
        command = [sys.executable, __file__, "--library", library, "--weights", args.weights, "--sizes",
                   *map(str, args.sizes), "--steps", *map(str, args.steps), "--engine", args.engine]
        self.process = subprocess.Popen(command + (["--fp16"] if args.fp16 else []), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.ready = self.read()

    def read(self):
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise SystemExit(f"a benchmark worker exited (code {self.process.wait()}); its error is above")

    def ask(self, request):
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def interleaved(workers, repeats, only_rows=None):
    """Each row run by the libraries in turn, pair after pair (which goes first alternates), so that
    the machine's changes of speed during the run reach both alike. Per row: {library: median
    seconds}, and the median of the pairs' ratios. only_rows: the rows whose names contain one of
    these words (default: all)."""
    results = {library: {} for library in workers}
    ratios = {}
    rows = next(iter(workers.values())).ready["rows"]
    for name, warm in rows.items():
        if only_rows and not any(word in name for word in only_rows):
            continue
        present = {library: worker for library, worker in workers.items() if name in worker.ready["rows"]}
        if warm:
            for worker in present.values():
                worker.ask(name)
                time.sleep(PAUSE_S)
        pairs = []
        for repeat in range(repeats if warm else max(1, repeats // 2)):
            order = list(present) if repeat % 2 == 0 else list(present)[::-1]
            seconds = {}
            for library in order:
                seconds[library] = present[library].ask(name)["seconds"]
                time.sleep(PAUSE_S)
            pairs.append(seconds)
        for library in present:
            results[library][name] = statistics.median(pair[library] for pair in pairs)
        if len(present) == 2:
            ratios[name] = statistics.median(pair["ours"] / pair["diffusers"] for pair in pairs)
    return results, ratios


# OpenMP threads spin for a while after a parallel region: a pause keeps one library's spinning
# threads out of the other's next run.
PAUSE_S = 0.5


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
    parser.add_argument("--rows", nargs="+", help="only the rows whose names contain one of these words, e.g. "
                                                  "'whole image' (a 50-step image takes minutes a run)")
    parser.add_argument("--library", choices=["ours", "diffusers", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps_by_size = dict(zip(args.sizes, args.steps + [args.steps[-1]] * len(args.sizes)))

    if args.library == "export":
        return export_graphs(args.weights, args.engine)
    if args.library:
        return serve(args.library, args, steps_by_size)

    libraries = [args.only] if args.only else ["ours", "diffusers"]
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as scratch:
        if not args.weights:
            args.weights = os.path.join(scratch, "weights")
            make_weights(args.weights)
        # Graphs are exported in a process of their own, so that the rows and the peak memory below
        # are those of every later run; the export is a one-off, shown on its own line.
        # Paddle is never imported here: importing it sets OMP_NUM_THREADS=1, which the processes
        # started below would inherit (PyTorch would then run on one core).
        cached, export_seconds = True, 0.0
        if "ours" in libraries:
            start = time.perf_counter()
            output = subprocess.run([sys.executable, __file__, "--library", "export", "--weights", args.weights,
                                     "--engine", args.engine], check=True, capture_output=True, text=True).stdout
            cached = json.loads(output.strip().splitlines()[-1])["cached"]
            export_seconds = time.perf_counter() - start
        # Both stay loaded, each in its own process (so peak memory is each one's own), and take turns.
        workers = {library: Worker(library, args) for library in libraries}
        try:
            results, ratios = interleaved(workers, args.repeats, args.rows)
            summary = {library: {"device": worker.ready["device"], "load": worker.ready["load"],
                                 "rows": results[library], "peak_mib": worker.ask("peak")["peak_mib"]}
                       for library, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    print_table(args, summary, ratios, cached, export_seconds)


ROW_WIDTH = 48


def print_table(args, results, ratios, cached, export_seconds):
    devices = ", ".join(f"{library} {result['device']}" for library, result in results.items())
    print(f"# {' '.join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + sys.argv[1:])}")
    print(f"# device: {devices} ({'fp16' if args.fp16 else 'fp32'}; our engine on CPU: {args.engine}); "
          f"{os.cpu_count()} CPU cores; the libraries take turns, row by row: medians of {args.repeats} runs "
          f"each after a warm-up (whole image: {max(1, args.repeats // 2)}, no warm-up); ours/diffusers is "
          "the median of the turns' ratios")
    if "ours" in results:
        print("# ours: CPU graphs already cached" if cached else
              f"# ours, first use of these weights: {export_seconds:.0f} s to load them and export the CPU "
              "graphs (once)")
    on_gpu = any(result["device"] != "cpu" for result in results.values())
    memory_row = "peak GPU memory, allocator (MiB)" if on_gpu else "peak RSS (MiB)"
    columns = [f"{library} (s)" for library in results]
    both = len(results) == 2
    print("| " + " | ".join([f"{'row':<{ROW_WIDTH}}"] + [f"{c:>13}" for c in columns] +
                            ([f"{'ours/diffusers':>14}"] if both else [])) + " |")
    print("|" + "|".join(["-" * (ROW_WIDTH + 2)] + ["-" * 15] * len(columns) + (["-" * 16] if both else [])) + "|")
    names = ["load weights"] + list(next(iter(results.values()))["rows"]) + [memory_row]
    for row in names:
        if row == "load weights":
            values = [result["load"] for result in results.values()]
        elif row == memory_row:
            values = [result["peak_mib"] for result in results.values()]
        else:
            values = [result["rows"].get(row) for result in results.values()]  # diffusers has no preview
        cells = [f"{'-':>13}" if v is None else f"{v:>13.0f}" if row == memory_row else f"{v:>13.3f}"
                 for v in values]
        if both:
            ratio = ratios.get(row, values[0] / values[1] if None not in values else None)
            cells.append(f"{'-':>14}" if ratio is None else f"{ratio:>14.2f}")
        print("| " + " | ".join([f"{row:<{ROW_WIDTH}}"] + cells) + " |")


if __name__ == "__main__":
    main()
