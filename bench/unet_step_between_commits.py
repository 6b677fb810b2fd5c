"""One 256 px guided UNet step (batch 2, CPU graphs) of the checkout at ROOT, on the weights at
WEIGHTS: run it for two checkouts in turn to tell a code change from this machine's drift.

    git worktree add /tmp/old 2ff929d
    .venv/bin/python bench/unet_step_between_commits.py /tmp/old DIR /tmp/cache-old
    .venv/bin/python bench/unet_step_between_commits.py . DIR /tmp/cache-new

DIR: a full-size random-weights folder (bench.py's `make_weights`); each cache folder gets its graphs.
"""
import os
import statistics
import sys
import time

root, weights, cache = sys.argv[1:4]
sys.path.insert(0, os.path.abspath(root))
os.environ["STABLE_DIFFUSION_CACHE"] = cache
import paddle  # noqa: E402
from stable_diffusion.pipeline import StableDiffusionPipeline, select_device  # noqa: E402

try:
    from stable_diffusion.loading import load_models
except ImportError:  # before loading/ existed
    from stable_diffusion.weights import load_models

select_device(False)
pipe = StableDiffusionPipeline(load_models(weights), engine="inference")
paddle.set_grad_enabled(False)
latents, context = paddle.randn([2, 4, 32, 32]), pipe.encode_text(["a", ""])
pipe.unet(latents, 500.0, context)  # the first step at a size prepares oneDNN's copies
times = []
for _ in range(5):
    start = time.perf_counter()
    pipe.unet(latents, 500.0, context).numpy()
    times.append(time.perf_counter() - start)
print(f"{root}: 256 px guided UNet step, median of 5: {statistics.median(times):.3f} s "
      f"({', '.join(f'{t:.2f}' for t in times)})")
