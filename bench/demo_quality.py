"""Does the demo model draw what its prompt names? Retrieval accuracy over a fixed list of emoji.

For each name in PROMPTS, one image through the module (`StableDiffusion(model="demo")`, the
model's defaults unless overridden), then every reference emoji is ranked by distance to it in a
fixed feature space (tools/emoji_retrieval.py: 16x16 colour thumbnails of the drawn part). Prints
top-1 and top-5 accuracy (chance: 1 and 5 in 1,361) and writes a grid: each prompt's picture beside
the emoji it names.

    .venv/bin/python bench/demo_quality.py [--guidance_scale 5 --num_inference_steps 20 --sampler ddim]
    .venv/bin/python bench/demo_quality.py --sampler unipc --num_inference_steps 10 --guidance_cutoff 0.4

References: tests/data/emoji_thumbnails.npz (no font needed).
"""
import argparse
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from tools.emoji_retrieval import PROMPTS, load_references, rank_of  # noqa: E402

REFERENCES = os.path.join(HERE, "..", "tests", "data", "emoji_thumbnails.npz")


def labelled(image, text, scale):
    tile = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
    canvas.paste(tile, (0, 0))
    ImageDraw.Draw(canvas).text((2, tile.height + 1), text[:22], fill="black")
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="the demo model's folder to measure (default: the shipped one)")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--guidance_cutoff", type=float, default=None)
    parser.add_argument("--deep_cache_interval", type=int, default=None)
    parser.add_argument("--token_merging", type=float, default=None)
    parser.add_argument("--fast", action="store_true", help="the fast preset (options.FAST_PRESET) for what is unset")
    parser.add_argument("--drop_prompt", action="store_true", help="a control: generate from an unrelated prompt")
    parser.add_argument("--grid", default=os.path.join(HERE, "demo_quality.png"))
    args = parser.parse_args()

    from stable_diffusion.module import StableDiffusion
    names, references = load_references(REFERENCES)
    module = StableDiffusion(model=args.model)
    overrides = {k: v for k, v in vars(args).items()
                 if k in ("guidance_scale", "num_inference_steps", "sampler", "guidance_cutoff", "deep_cache_interval",
                          "token_merging", "fast")
                 and v is not None and v is not False}
    ranks, tiles, start = [], [], time.perf_counter()
    for seed, name in enumerate(PROMPTS):
        prompt = "a drawing" if args.drop_prompt else name
        document = module.generate_image(prompt, seed=seed, output_dir=None, display_rate=0, use_gpu=False,
                                         **overrides)[0]
        image = document.chunks[0].load_uri_to_image_tensor().tensor
        rank = rank_of(image, references, names.index(name))
        ranks.append(rank)
        print(f"{name:28s} rank {rank}", flush=True)
        tiles.append((labelled(image, f"{name} #{rank + 1}", 2), labelled(reference_image(name), "reference", 2)))
    seconds = time.perf_counter() - start
    ranks = np.array(ranks)
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the model's defaults"
    print(f"\n{len(PROMPTS)} prompts ({settings}{', prompt dropped' if args.drop_prompt else ''}), "
          f"{len(names)} references: top-1 {100 * (ranks < 1).mean():.0f}%, top-5 {100 * (ranks < 5).mean():.0f}%, "
          f"median rank {np.median(ranks) + 1:.0f}; {seconds / len(PROMPTS):.2f} s per image")
    write_grid(tiles, args.grid)
    print(f"grid: {args.grid}")


def reference_image(name):
    """The emoji itself at 64x64, rendered from the font when it is installed, else its thumbnail."""
    try:
        from tools.train_demo_model import render_dataset
        if not hasattr(reference_image, "dataset"):
            reference_image.dataset = dict(zip(*render_dataset()))
        return reference_image.dataset[name]
    except Exception:
        names, references = load_references(REFERENCES)
        return np.asarray(Image.fromarray(references[names.index(name)]).resize((64, 64), Image.NEAREST))


def write_grid(tiles, path, columns=4):
    width, height = tiles[0][0].width * 2, tiles[0][0].height
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width + (columns - 1) * 8, rows * height), "white")
    for k, (picture, reference) in enumerate(tiles):
        x, y = (k % columns) * (width + 8), (k // columns) * height
        grid.paste(picture, (x, y))
        grid.paste(reference, (x + picture.width, y))
    partial = path + ".partial.png"
    grid.save(partial)
    os.replace(partial, path)


if __name__ == "__main__":
    main()
