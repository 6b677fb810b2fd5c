"""Single-op timings behind bench/NOTES.md: variants of one operation in Paddle (eager, or traced and run
by Paddle Inference with oneDNN, as the CPU engine does) next to PyTorch, on shapes from SD at 256 and
512 px. Prints milliseconds per call (median of 5 after a warm-up).

    .venv/bin/python bench/ops.py [--only "UNet upsampling"]

A Paddle Inference call also copies its input in and its output out; the `copy in and out` rows time
a graph that only adds x to itself, so that cost can be told apart from the op's own.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import torch
from paddle.static import InputSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import timed  # noqa: E402
from stable_diffusion.cpu.compiled import CompiledLayer  # noqa: E402
from stable_diffusion.models.layers import Upsample2D, scaled_dot_product_attention  # noqa: E402

CORES = os.cpu_count() or 1


class Function(nn.Layer):
    def __init__(self, fn, module=None):
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, x):
        return self.fn(self.module, x)


class TileThenConv(Upsample2D):
    """The upsampling this port used before the phases: every output pixel built, then the 3x3 conv."""

    def forward(self, x, size=None):
        return self.conv(paddle.tile(x.unsqueeze([3, 5]), [1, 1, 1, 2, 1, 2]).reshape(
            [0, 0, 2 * paddle.shape(x)[2], 2 * paddle.shape(x)[3]]))


class PhasedConv(Upsample2D):
    """The upsampling before the transposed convolution: per output phase (row and column parity) a
    2x2 convolution, all four as one convolution with 4x the output channels, then interleaved."""
    PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
    PHASES = [(0, 0), (0, 1), (1, 0), (1, 1)]

    def forward(self, x, size=None):
        taps = [paddle.to_tensor(t) for t in self.PHASE_TAPS]
        kernels = [paddle.matmul(paddle.matmul(taps[a], self.conv.weight), taps[b], transpose_y=True)
                   for a, b in self.PHASES]
        y = F.conv2d(x, paddle.concat(kernels), paddle.concat([self.conv.bias] * 4), padding=1)
        height, width = paddle.shape(x)[2], paddle.shape(x)[3]
        phases = [part[:, :, a:a + height, b:b + width]
                  for part, (a, b) in zip(paddle.split(y, 4, axis=1), self.PHASES)]
        out = paddle.stack([paddle.stack(phases[:2], axis=-1), paddle.stack(phases[2:], axis=-1)], axis=3)
        return out.reshape([0, 0, 2 * height, 2 * width])


class ConvolvedEdges(Upsample2D):
    """The UNet's upsampling to a given size before section 24: the last row and column recomputed by
    3x3 convolutions over the last two upsampled rows (columns), rather than by a matmul."""

    def forward(self, x, size):
        kernel, _ = self.kernels()
        out = F.conv2d_transpose(x, kernel, self.conv.bias, stride=2, padding=1)
        last_row = self.convolved_row(x, size, self.conv.weight)
        last_column = self.convolved_row(x.transpose([0, 1, 3, 2]), [size[1], size[0]],
                                         self.conv.weight.transpose([0, 1, 3, 2]))
        out = paddle.concat([out[:, :, :size[0] - 1, :size[1] - 1],
                             last_column.transpose([0, 1, 3, 2])[:, :, :size[0] - 1]], axis=3)
        return paddle.concat([out, last_row], axis=2)

    def convolved_row(self, x, size, weight):
        odd = (2 * paddle.shape(x)[2] - size[0]).astype(x.dtype)
        padded = F.pad(x, [0, 0, 1, 0])
        upper = odd * padded[:, :, -2:-1] + (1 - odd) * padded[:, :, -1:]
        rows = paddle.repeat_interleave(paddle.concat([upper, x[:, :, -1:]], axis=2), 2, axis=3)
        return F.conv2d(rows[:, :, :, :size[1]], weight, self.conv.bias, padding=1)[:, :, 1:2]


def geglu_split(proj, x):
    hidden, gate = proj(x).chunk(2, axis=-1)
    return hidden * F.gelu(gate)


def geglu_halves(proj, x):
    inner = proj.weight.shape[1] // 2
    return (F.linear(x, proj.weight[:, :inner], proj.bias[:inner]) *
            F.gelu(F.linear(x, proj.weight[:, inner:], proj.bias[inner:])))


def self_attention(chunks):
    return lambda _, x: scaled_dot_product_attention(x, x, x, heads=8, query_chunks=chunks)


def torch_attention(x):
    heads = x.reshape(x.shape[0], x.shape[1], 8, -1).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(heads, heads, heads)


def cases():
    """(name, input shape, [(variant, paddle layer, engine)], torch callable)"""
    conv = nn.Conv2D(320, 320, 3, padding=1)
    torch_conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    norm = nn.GroupNorm(32, 128, epsilon=1e-6)
    torch_norm = torch.nn.GroupNorm(32, 128, eps=1e-6)
    upsample = Upsample2D(256)
    tile_upsample = TileThenConv(256)
    tile_upsample.set_state_dict(upsample.state_dict())
    phased_upsample = PhasedConv(256)
    phased_upsample.set_state_dict(upsample.state_dict())
    torch_upsample = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2.0, mode="nearest"),
                                         torch.nn.Conv2d(256, 256, 3, padding=1))
    unet_upsample, doubling_only, convolved_edges = Upsample2D(1280), Upsample2D(1280), ConvolvedEdges(1280)
    doubling_only.set_state_dict(unet_upsample.state_dict())  # a graph frees its layer's weights
    convolved_edges.set_state_dict(unet_upsample.state_dict())
    torch_unet_upsample = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              torch.nn.Conv2d(1280, 1280, 3, padding=1))
    proj, proj_halves = nn.Linear(320, 2 * 1280), nn.Linear(320, 2 * 1280)
    proj_halves.set_state_dict(proj.state_dict())  # a graph takes its layer's weights: one layer each
    torch_proj = torch.nn.Linear(320, 2 * 1280)

    def torch_geglu(x):
        hidden, gate = torch_proj(x).chunk(2, dim=-1)
        return hidden * torch.nn.functional.gelu(gate)
    big = (1, 128, 512, 512)
    doubled = lambda: Function(lambda _, x: x + x)  # noqa: E731
    return [
        ("conv 3x3 320->320", (2, 320, 32, 32),
         [("eager, 1 thread", Function(lambda m, x: m(x), conv), "eager-1"),
          ("eager, all cores", Function(lambda m, x: m(x), conv), "eager"),
          ("inference", Function(lambda m, x: m(x), conv), "inference")], torch_conv),
        ("self-attention, 8 heads, 512 px UNet level 0", (2, 4096, 320),
         [("inference, all queries at once", Function(self_attention(1)), "inference"),
          ("inference, 8 blocks of queries", Function(self_attention(8)), "inference"),
          ("inference, 16 blocks of queries", Function(self_attention(16)), "inference")], torch_attention),
        ("copy in and out", (2, 4096, 320), [("inference", doubled(), "inference")], lambda x: x + x),
        ("GEGLU 320 -> 2x1280", (2, 4096, 320),
         [("inference, one product split in two", Function(geglu_split, proj), "inference"),
          ("inference, a product per half of the weight", Function(geglu_halves, proj_halves), "inference")], torch_geglu),
        ("SiLU", big, [("inference, F.silu", Function(lambda _, x: F.silu(x)), "inference"),
                       ("inference, F.swish", Function(lambda _, x: F.swish(x)), "inference")],
         torch.nn.functional.silu),
        ("GroupNorm(32)", big, [("inference", Function(lambda m, x: m(x), norm), "inference")], torch_norm),
        ("copy in and out", big, [("inference", doubled(), "inference")], lambda x: x + x),
        ("nearest x2 + conv 3x3 256->256", (1, 256, 256, 256),
         [("inference, tile then conv", Function(lambda m, x: m(x), tile_upsample), "inference"),
          ("inference, 2x2 conv per phase", Function(lambda m, x: m(x), phased_upsample), "inference"),
          ("inference, transposed conv", Function(lambda m, x: m(x), upsample), "inference")], torch_upsample),
        ("UNet upsampling to a given size, 1280 channels, 512 px", (2, 1280, 16, 16),
         [("inference, x2 alone (no edges)", Function(lambda m, x: m(x), doubling_only), "inference"),
          ("inference, edges by convolutions", Function(lambda m, x: m(x, (32, 32)), convolved_edges), "inference"),
          ("inference, edges by a matmul", Function(lambda m, x: m(x, (32, 32)), unet_upsample), "inference")],
         torch_unet_upsample),
        ("copy in and out (output 4x the input)", (1, 256, 256, 256),
         [("inference", Function(lambda _, x: paddle.tile(x + x, [1, 1, 2, 2])), "inference")],
         lambda x: (x + x).repeat(1, 1, 2, 2)),
    ]


def paddle_ms(layer, engine, data):
    if engine.startswith("eager"):
        paddle.base.core.set_num_threads(1 if engine == "eager-1" else CORES)
        x = paddle.to_tensor(data)
        return timed(lambda: layer(x).numpy(), 5) * 1000
    spec = [InputSpec([None, *data.shape[1:]], "float32", "x")]
    compiled = CompiledLayer(layer, spec, os.path.join(tempfile.mkdtemp(), "graph"), CORES)
    return timed(lambda: compiled(data), 5) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(CORES)
    print(f"# {CORES} CPU cores; ms per call, median of 5 after a warm-up")
    print("| op | input | variant | ms |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name, shape, variants, torch_fn in cases():
            if args.only not in name:
                continue
            data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for variant, layer, engine in variants:
                layer.eval()
                print(f"| {name} | {list(shape)} | paddle {variant} | {paddle_ms(layer, engine, data):.1f} |", flush=True)
            tensor = torch.from_numpy(data)
            print(f"| {name} | {list(shape)} | torch | {timed(lambda: torch_fn(tensor), 5) * 1000:.1f} |", flush=True)


if __name__ == "__main__":
    main()
