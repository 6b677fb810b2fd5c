"""What changing LoRAs between calls costs, ours against diffusers, on full-size SD v1.5 (random weights).

A kohya-layout LoRA (rank 16 on every attention projection of the UNet, as typical style LoRAs
have; no text-encoder layers, which diffusers 0.42 cannot place in transformers 5's text encoder) is
written once. Ours: the time `TextToImage.load_pipeline` takes for the plain model (graphs cached),
the LoRA (merged into copies of the weights it touches, lent to new predictors of the loaded graphs),
back to the plain model, and the LoRA again; then the first UNet step after the switch, against one
before it (a new predictor makes oneDNN's copies of the weights again on its first run). diffusers,
in a process of its own: `load_lora_weights` + `fuse_lora`, and `unfuse_lora` + `unload_lora_weights`.

    .venv/bin/python bench/lora_switch.py --weights /tmp/sdw      # reuses bench.py's weights folder
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(weights, path, rank=16):
    """A kohya file for the model at `weights`, its shapes read from the models' structure alone."""
    import numpy as np
    from safetensors.numpy import save_file
    from stable_diffusion.loading import load_models
    models = load_models(weights, skip_weights=("text_encoder", "unet", "vae"))
    rng = np.random.default_rng(0)
    state = {}
    for prefix, model in (("lora_unet_", models.unet),):
        for name, param in model.named_parameters():
            module = name[: -len(".weight")]
            if name.endswith(".weight") and module.endswith(ATTENTION_PROJECTIONS):
                in_features, out_features = param.shape  # Paddle's Linear layout
                key = prefix + module.replace(".", "_")
                state[f"{key}.lora_down.weight"] = rng.standard_normal((rank, in_features), np.float32) * 0.01
                state[f"{key}.lora_up.weight"] = rng.standard_normal((out_features, rank), np.float32) * 0.01
                state[f"{key}.alpha"] = np.array(rank / 2, np.float32)
    save_file(state, path)
    return len(state) // 3


def ours(weights, lora):
    from stable_diffusion.text_to_image import TextToImage
    TextToImage(weights).load_pipeline(use_gpu=False, enable_fp16=False)  # the plain graphs exported, if not yet
    generator = TextToImage(weights)
    rows = {}
    for label, loras in (("plain model, graphs cached", ()), ("LoRA, first time", ((lora, 0.8),)),
                         ("plain model again", ()), ("LoRA again", ((lora, 0.8),))):
        start = time.perf_counter()
        pipeline = generator.load_pipeline(use_gpu=False, enable_fp16=False, loras=loras)
        rows[label] = time.perf_counter() - start
    import paddle
    sample, context = paddle.randn([2, 4, 64, 64]), paddle.randn([2, 77, 768])
    for label in ("first 512 px UNet step after the switch", "next 512 px UNet step"):
        start = time.perf_counter()
        pipeline.unet(sample, 500.0, context)
        rows[label] = time.perf_counter() - start
    return rows


def diffusers(weights, lora):
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer(os.path.join(weights, "tokenizer", "vocab.json"),
                              os.path.join(weights, "tokenizer", "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(weights, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(weights, subfolder="text_encoder"), tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(weights, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(weights, subfolder="scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    rows = {}
    start = time.perf_counter()
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.8)
    rows["LoRA, first time"] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    rows["plain model again"] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.8)
    rows["LoRA again"] = time.perf_counter() - start
    sample, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    with torch.no_grad():
        for label in ("first 512 px UNet step after the switch", "next 512 px UNet step"):
            start = time.perf_counter()
            pipe.unet(sample, 500, context)
            rows[label] = time.perf_counter() - start
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a diffusers folder of full-size weights (default: random ones, written "
                                          "in a temp dir by bench.py's make_weights)")
    parser.add_argument("--library", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        print(json.dumps((ours if args.library == "ours" else diffusers)(args.weights, args.lora)))
        return
    scratch = tempfile.mkdtemp(prefix="lora-switch-")
    weights = args.weights
    if not weights:
        from bench import make_weights
        weights = os.path.join(scratch, "weights")
        make_weights(weights)
    lora = os.path.join(scratch, "style_lora.safetensors")
    layers = write_lora(weights, lora)
    results = {}
    for library in ("ours", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--library", library, "--weights", weights, "--lora", lora],
                             check=True, capture_output=True, text=True).stdout
        results[library] = json.loads(out.strip().splitlines()[-1])
    print(f"LoRA: kohya layout, rank 16, {layers} layers ({os.path.getsize(lora) / 2 ** 20:.0f} MiB); "
          f"{len(os.sched_getaffinity(0))} cores")
    print(f"| {'step':<36} | ours (s) | diffusers (s) |")
    print(f"|{'-' * 38}|----------|---------------|")
    for row in results["ours"]:
        theirs = results["diffusers"].get(row)
        print(f"| {row:<36} | {results['ours'][row]:8.1f} | {'-' if theirs is None else f'{theirs:13.1f}'} |")


if __name__ == "__main__":
    main()
