"""Paddle Inference's own per-operator profile of one of our CPU graphs, run a few times at one image
size: which operators the time goes to (oneDNN kernels are named onednn_op.*, Paddle's own pd_op.*;
pd_op.onednn_to_paddle_layout is a reorder out of oneDNN's layout). Paddle prints its table when the
process ends (and writes profile.log in the current folder); the first run includes oneDNN's one-off
preparation, so use several.

    .venv/bin/python bench/op_profile.py --weights /tmp/sdw --graph vae_decoder --size 512 --runs 3

--weights: a diffusers folder whose CPU graphs are cached (bench/bench.py or memory.py export them).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--graph", choices=["unet", "vae_decoder", "text_encoder"], default="unet")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--token_merging", type=float, default=0.0, help="the UNet graph traced for this ToMe ratio")
    args = parser.parse_args()

    from paddle import inference
    from stable_diffusion.cpu.compiled import graph_folder, unet_graph_names
    from stable_diffusion.models.token_merging import merge_groups
    from stable_diffusion.pipeline import cpu_threads
    name = unet_graph_names(args.token_merging)[0] if args.graph == "unet" else args.graph
    folder = os.path.join(graph_folder(args.weights), name)
    if not os.path.isdir(folder):
        sys.exit(f"{folder} does not exist: export the graphs first (bench/bench.py --weights {args.weights})")
    latent = args.size // 8
    rng = np.random.default_rng(0)
    inputs = {"unet": {"sample": rng.standard_normal((2, 4, latent, latent)),
                       "time_features": rng.standard_normal((1, 320)),
                       "context": rng.standard_normal((2, 77, 768))},
              "vae_decoder": {"latents": rng.standard_normal((1, 4, latent, latent))},
              "text_encoder": {"input_ids": np.zeros((2, 77), np.int64)}}[args.graph]
    if args.graph == "unet" and args.token_merging:
        inputs["merge_destination"], inputs["merge_source"] = merge_groups(latent, latent, 500)
    config = inference.Config(os.path.join(folder, "model.json"), os.path.join(folder, "model.pdiparams"))
    config.disable_gpu()
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(cpu_threads())
    config.enable_profile()
    predictor = inference.create_predictor(config)
    for name, array in inputs.items():
        predictor.get_input_handle(name).copy_from_cpu(array if array.dtype == np.int64 else array.astype(np.float32))
    for run in range(args.runs):
        start = time.perf_counter()
        predictor.run()
        print(f"# run {run + 1}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
