"""The Paddle port against the PyTorch reference: same weights, same inputs, same numbers."""
import numpy as np
import paddle
import pytest
import torch

from reference import max_relative_error, to_numpy
from stable_diffusion.loading import load_models

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ours(diffusers_folder):
    kind, models, folder = diffusers_folder
    return kind, models, load_models(folder)


def test_text_encoder_matches_reference(ours):
    kind, reference, models = ours
    ids = np.array([models.tokenizer("a photo of an astronaut riding a horse"),
                    models.tokenizer("")], dtype=np.int64)
    with torch.no_grad():
        expected = reference["text_encoder"](torch.from_numpy(ids)).last_hidden_state
    got = models.text_encoder(paddle.to_tensor(ids))
    error = max_relative_error(got.numpy(), to_numpy(expected))
    print(f"[{kind}] text encoder max relative error {error:.2e}")
    assert error < TOLERANCE


@pytest.mark.parametrize("height,width", [(16, 16), (12, 20), (9, 7)])
def test_unet_matches_reference(ours, height, width):
    kind, reference, models = ours
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, height, width)).astype(np.float32)
    context = rng.standard_normal((2, 77, models.unet.config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        expected = reference["unet"](torch.from_numpy(sample), 981, torch.from_numpy(context)).sample
    got = models.unet(paddle.to_tensor(sample), 981, paddle.to_tensor(context))
    error = max_relative_error(got.numpy(), to_numpy(expected))
    print(f"[{kind}] unet {height}x{width} max relative error {error:.2e}")
    assert error < TOLERANCE


def test_vae_decoder_matches_reference(ours):
    kind, reference, models = ours
    latents = np.random.default_rng(1).standard_normal((1, 4, 12, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference["vae"].decode(torch.from_numpy(latents)).sample
    got = models.vae.decode(paddle.to_tensor(latents))
    error = max_relative_error(got.numpy(), to_numpy(expected))
    print(f"[{kind}] vae decoder max relative error {error:.2e}")
    assert error < TOLERANCE


def test_vae_encoder_matches_reference(ours):
    kind, reference, models = ours
    images = np.random.default_rng(2).uniform(-1, 1, (1, 3, 24, 16)).astype(np.float32)
    with torch.no_grad():
        expected = reference["vae"].encode(torch.from_numpy(images)).latent_dist
    mean, logvar = models.vae.encode(paddle.to_tensor(images))
    assert max_relative_error(mean.numpy(), to_numpy(expected.mean)) < TOLERANCE
    assert max_relative_error(logvar.numpy(), to_numpy(expected.logvar)) < TOLERANCE


def test_config_values_reach_the_model(ours):
    kind, reference, models = ours
    assert models.vae.scaling_factor == reference["vae"].config.scaling_factor
    assert models.vae.downsampling_factor == 2 ** (len(reference["vae"].config.block_out_channels) - 1)


@pytest.mark.parametrize("length", [1, 3, 63, 64])
@pytest.mark.parametrize("query_chunks", [1, 2, 8, 16])
def test_attention_in_blocks_of_queries_matches_torch(length, query_chunks):
    from stable_diffusion.models.layers import scaled_dot_product_attention
    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((2, n, 3 * 8)).astype(np.float32) for n in (length, 11, 11))
    ours = scaled_dot_product_attention(*map(paddle.to_tensor, (q, k, v)), heads=3, query_chunks=query_chunks)
    split = lambda a: torch.from_numpy(a).reshape(2, -1, 3, 8).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    expected = expected.transpose(1, 2).reshape(2, length, 24).numpy()
    assert ours.shape == [2, length, 24]
    assert max_relative_error(ours.numpy(), expected) < 1e-5


@pytest.mark.parametrize("target", [None, (6, 10), (5, 9), (6, 9), (5, 10)])
def test_upsample_by_transposed_convolution_matches_interpolate_then_conv(target):
    from diffusers.models.resnet import Upsample2D as Reference
    from stable_diffusion.models.layers import Upsample2D
    torch.manual_seed(0)
    reference = Reference(8, use_conv=True).eval()
    ours = Upsample2D(8)
    ours.set_state_dict({"conv.weight": to_numpy(reference.conv.weight), "conv.bias": to_numpy(reference.conv.bias)})
    x = np.random.default_rng(0).standard_normal((2, 8, 3, 5)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), output_size=target).numpy()
    assert max_relative_error(ours(paddle.to_tensor(x), size=target).numpy(), expected) < 1e-5


def test_attention_mask_refuses_blocks_of_queries():
    from stable_diffusion.models.layers import scaled_dot_product_attention
    x = paddle.zeros([1, 4, 8])
    with pytest.raises(ValueError, match="query_chunks=1"):
        scaled_dot_product_attention(x, x, x, heads=2, mask=paddle.zeros([1, 1, 4, 4]), query_chunks=2)


@pytest.mark.parametrize("shape", [(2, 64, 9, 7), (1, 32, 48, 40)])
def test_group_norm_in_a_traced_graph_matches_torch_without_paddles_kernel(shape, tmp_path):
    # In a graph, GroupNorm is pooled statistics and a per-channel scale and shift, which keep
    # oneDNN's layout (see layers.GroupNorm); Paddle's group_norm operator must not be in it.
    from paddle.static import InputSpec
    from stable_diffusion.cpu.compiled import CompiledLayer
    from stable_diffusion.models.layers import GroupNorm
    rng = np.random.default_rng(0)
    channels = shape[1]
    x = (rng.standard_normal(shape) * 3 + rng.standard_normal((1, channels, 1, 1)) * 2).astype(np.float32)
    weight, bias = rng.random(channels).astype(np.float32) + 0.5, rng.random(channels).astype(np.float32) - 0.5
    expected = torch.nn.functional.group_norm(torch.from_numpy(x), 32, torch.from_numpy(weight),
                                              torch.from_numpy(bias), eps=1e-6).numpy()
    norm = GroupNorm(32, channels, epsilon=1e-6)
    norm.set_state_dict({"weight": weight, "bias": bias})
    graph = CompiledLayer(norm, [InputSpec([None, channels, None, None], "float32", "x")], str(tmp_path / "graph"),
                          threads=1)
    assert max_relative_error(graph(x).numpy(), expected) < 1e-5
    with open(graph.program) as f:
        program = f.read()
    assert '"1.pool2d"' in program and '"1.group_norm"' not in program
