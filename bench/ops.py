"""Single-op timings behind bench/NOTES.md: Paddle eager (1 thread and all cores), Paddle Inference
with oneDNN, and PyTorch, on shapes from the SD UNet at 256 px. Prints milliseconds per call (median).

    .venv/bin/python bench/ops.py
"""
import os
import sys
import tempfile

import numpy as np
import paddle
import paddle.nn as nn
import torch
from paddle.static import InputSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import timed  # noqa: E402
from stable_diffusion.compiled import CompiledLayer  # noqa: E402
from stable_diffusion.models.layers import scaled_dot_product_attention  # noqa: E402

CORES = os.cpu_count() or 1


def median_ms(fn, repeats=5):
    return timed(fn, repeats) * 1000


class Conv(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(320, 320, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class SelfAttention(nn.Layer):
    def forward(self, x):
        return scaled_dot_product_attention(x, x, x, heads=8)


def main():
    cases = [("conv 3x3 320->320, [2,320,32,32]", Conv, (2, 320, 32, 32),
              lambda: torch.nn.Conv2d(320, 320, 3, padding=1), lambda m, x: m(x)),
             ("self-attention 8 heads, [2,1024,320]", SelfAttention, (2, 1024, 320),
              lambda: None, lambda m, x: torch.nn.functional.scaled_dot_product_attention(
                  *[x.reshape(2, 1024, 8, 40).transpose(1, 2)] * 3))]
    print(f"# {CORES} CPU cores; ms per call, median of 5")
    print("| op | paddle eager, 1 thread | paddle eager, all cores | paddle inference + oneDNN | torch |")
    print("|---|---|---|---|---|")
    for name, layer_cls, shape, torch_layer, torch_call in cases:
        data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        layer = layer_cls()
        layer.eval()
        x = paddle.to_tensor(data)
        paddle.base.core.set_num_threads(1)
        one = median_ms(lambda: layer(x).numpy())
        paddle.base.core.set_num_threads(CORES)
        many = median_ms(lambda: layer(x).numpy())
        spec = [InputSpec([None] * len(shape), "float32", "x")]
        compiled = CompiledLayer(layer, spec, os.path.join(tempfile.mkdtemp(), "graph"), CORES)
        inference_ms = median_ms(lambda: compiled(data).numpy())
        module = torch_layer()
        tx = torch.from_numpy(data)
        with torch.no_grad():
            torch_ms = median_ms(lambda: torch_call(module, tx))
        print(f"| {name} | {one:.1f} | {many:.1f} | {inference_ms:.1f} | {torch_ms:.1f} |")


if __name__ == "__main__":
    main()
