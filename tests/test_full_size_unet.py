"""The real SD v1.5 UNet configuration (860M parameters), random weights, both libraries."""
import numpy as np
import paddle
import torch

from reference import max_relative_error
from stable_diffusion.loading.state_dict import default_config, load_state_dict
from stable_diffusion.models.unet import UNet2DConditionModel


def test_full_size_sd15_unet_matches_reference():
    from diffusers import UNet2DConditionModel as Reference
    config = default_config("unet")
    torch.manual_seed(0)
    reference = Reference(**config).eval()
    assert sum(p.numel() for p in reference.parameters()) > 850_000_000
    ours = UNet2DConditionModel(config)
    load_state_dict(ours, {k: v.numpy() for k, v in reference.state_dict().items()}, "reference")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample), 500, torch.from_numpy(context)).sample.numpy()
    del reference
    got = ours(paddle.to_tensor(sample), 500, paddle.to_tensor(context)).numpy()
    error = max_relative_error(got, expected)
    print(f"full-size SD v1.5 UNet max relative error {error:.2e}")
    assert error < 1e-4
