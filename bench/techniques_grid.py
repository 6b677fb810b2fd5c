"""Side by side: what each way of running fewer or cheaper UNet evaluations draws on the demo model.

One row per emoji name (the first --prompts of tools/emoji_retrieval.PROMPTS, seed = index, as
demo_quality.py), one column per setting: the emoji itself, the model's defaults, then each technique
alone and the fast preset. Each picture is labelled with its rank among all 1,361 emoji (1: found first).
The accuracy over all 56 names is demo_quality.py's to measure; this is the picture of it.

    .venv/bin/python bench/techniques_grid.py [--prompts 12] [--out bench/techniques.png]
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from demo_quality import REFERENCES, labelled, reference_image  # noqa: E402
from tools.emoji_retrieval import PROMPTS, load_references, rank_of  # noqa: E402

SETTINGS = {
    "defaults": {},
    "DeepCache 2": {"deep_cache_interval": 2},
    "cut-off 0.4": {"guidance_cutoff": 0.4},
    "UniPC 10": {"sampler": "unipc", "num_inference_steps": 10},
    "ToMe 0.5": {"token_merging": 0.5},
    "--fast": {"fast": True},
    "--fast, ToMe 0.5": {"fast": True, "token_merging": 0.5},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(HERE, "techniques.png"))
    args = parser.parse_args()
    from stable_diffusion.module import StableDiffusion
    names, references = load_references(REFERENCES)
    module = StableDiffusion(model="demo")
    scale = 2
    rows = []
    for seed, name in enumerate(PROMPTS[:args.prompts]):
        row = [labelled(reference_image(name), name, scale)]
        for setting, options in SETTINGS.items():
            document = module.generate_image(name, seed=seed, output_dir=None, display_rate=0, use_gpu=False,
                                             **options)[0]
            image = document.chunks[0].load_uri_to_image_tensor().tensor
            rank = rank_of(image, references, names.index(name)) + 1
            row.append(labelled(image, f"{setting} #{rank}", scale))
            print(f"{name:24s} {setting:12s} rank {rank}", flush=True)
        rows.append(row)
    tile_w, tile_h = rows[0][0].width, rows[0][0].height
    grid = Image.new("RGB", (len(rows[0]) * (tile_w + 4), len(rows) * (tile_h + 4)), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * (tile_w + 4), r * (tile_h + 4)))
    partial = args.out + ".partial.png"
    grid.save(partial)
    os.replace(partial, args.out)
    print(f"grid: {args.out} (columns: emoji, {', '.join(SETTINGS)})")


if __name__ == "__main__":
    main()
