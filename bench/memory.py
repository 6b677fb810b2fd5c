"""Where our CPU engine's memory goes: resident memory (RSS) and its peak after each step of a session
that loads the weights, encodes text, runs the UNet and the VAE decoder at each size, then runs the
UNet again from a new thread (as hub serving does per request).

    .venv/bin/python bench/memory.py --weights /tmp/sdw --sizes 256 512

--weights: a diffusers folder (bench/bench.py writes one with random full-size weights); its CPU graphs
are exported first if they are not cached yet.
"""
import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def reset_peak_rss():
    """From here on, VmHWM is the peak of this step alone (Linux: "5" to clear_refs resets it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mib():
    """Resident, peak resident since the last reset, and the part of resident mapped from files (libraries
    and the lent weights)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(status[field].split()[0]) // 1024 for field in ("VmRSS", "VmHWM", "RssFile"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()

    import paddle
    from stable_diffusion.cpu.compiled import unet_graph_cached
    from stable_diffusion.pipeline import StableDiffusionPipeline, select_device
    from stable_diffusion.loading import load_models
    select_device(use_gpu=False)
    if not unet_graph_cached(args.weights):
        StableDiffusionPipeline(load_models(args.weights), engine="inference")
        print("# graphs exported in a first pass; this process's peak includes that", flush=True)

    print("| step | seconds | RSS after (MiB) | peak RSS in the step (MiB) | of RSS, mapped files (MiB) |")
    print("|---|---|---|---|---|")

    def report(step, fn):
        reset_peak_rss()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        print(f"| {step} | {seconds:.1f} | " + " | ".join(map(str, rss_mib())) + " |", flush=True)

    holder = {}
    report("load (graphs cached)", lambda: holder.update(pipe=StableDiffusionPipeline(
        load_models(args.weights, skip_weights=("unet",)), engine="inference")))
    pipe = holder["pipe"]
    report("text encoding", lambda: holder.update(context=pipe.encode_text(["a", ""])))
    context = holder["context"]
    for size in args.sizes:
        latents = paddle.randn([2, 4, size // 8, size // 8])
        unet = lambda: pipe.unet(latents, 500.0, context).numpy()  # noqa: E731
        report(f"guided UNet step {size} px, first", unet)
        report(f"guided UNet step {size} px, again", unet)
        report(f"VAE decode {size} px", lambda: pipe.decode(latents[:1]))
        report(f"guided UNet step {size} px, after the decode", unet)
        thread = threading.Thread(target=lambda: report(f"guided UNet step {size} px, from a new thread", unet))
        thread.start()
        thread.join()


if __name__ == "__main__":
    main()
