"""Token merging (models/token_merging.py) against the tomesd package, on tensors and on whole images."""
import numpy as np
import paddle
import pytest
import torch
import tomesd

from reference import SCHEDULER, VOCAB_DIR
from stable_diffusion.loading import load_models
from stable_diffusion.models import token_merging
from stable_diffusion.pipeline import StableDiffusionPipeline



@pytest.mark.parametrize("height,width", [(8, 8), (5, 7), (16, 12)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_merge_and_unmerge_match_tomesd(height, width, ratio, monkeypatch):
    from tomesd.merge import bipartite_soft_matching_random2d
    rng = np.random.default_rng(height * width)
    x = rng.standard_normal((2, height * width, 16)).astype(np.float32)
    # tomesd's random destinations, drawn from a generator in the same state as the one it is given
    seed = int(ratio * 100) + height
    choice = torch.randint(4, size=(height // 2, width // 2, 1), generator=torch.Generator().manual_seed(seed))
    merge, unmerge = bipartite_soft_matching_random2d(torch.from_numpy(x), width, height, 2, 2,
                                                      int(height * width * ratio),
                                                      generator=torch.Generator().manual_seed(seed))
    expected_merged = merge(torch.from_numpy(x))
    expected = unmerge(expected_merged).numpy()

    monkeypatch.setattr(token_merging, "destination_choice", lambda cells_y, cells_x, t: choice[..., 0].numpy())
    destination, source = token_merging.merge_groups(height, width, timestep=1)
    ours_merge, ours_unmerge = token_merging.bipartite_soft_matching(
        paddle.to_tensor(x), paddle.to_tensor(destination), paddle.to_tensor(source), ratio)
    merged = ours_merge(paddle.to_tensor(x))
    assert merged.shape == list(expected_merged.shape)
    # The same tokens merged into the same ones (tomesd lists the kept ones in another order).
    np.testing.assert_allclose(np.sort(merged.numpy(), axis=1), np.sort(expected_merged.numpy(), axis=1), atol=1e-6)
    np.testing.assert_allclose(ours_unmerge(merged).numpy(), expected, atol=1e-6)
    assert np.abs(expected - x).max() > 0.1  # merging changed some tokens: the comparison is not of copies


def test_destinations_depend_on_the_timestep_only():
    first, second = token_merging.merge_groups(8, 8, 981), token_merging.merge_groups(8, 8, 981)
    np.testing.assert_array_equal(first[0], second[0])
    other = token_merging.merge_groups(8, 8, 961)[0]
    assert not np.array_equal(first[0], other)
    destination, source = first
    assert len(destination) == 16 and sorted(np.concatenate([destination, source]).tolist()) == list(range(64))
    # one destination in each 2x2 cell
    assert sorted(((destination // 8) // 2 * 4 + (destination % 8) // 2).tolist()) == list(range(16))


@pytest.fixture(scope="module")
def diffusers_with_tomesd(sd1_reference):
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)
    return Reference(vae=sd1_reference["vae"], text_encoder=sd1_reference["text_encoder"], tokenizer=tokenizer,
                     unet=sd1_reference["unet"], scheduler=DDIMScheduler.from_config(SCHEDULER), safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("engine", ["eager", "inference"])
def test_images_match_diffusers_with_tomesd(sd1_folder, diffusers_with_tomesd, engine, monkeypatch):
    """tomesd's defaults (ratio 0.5, self-attention at full latent size only) without its random
    destinations (use_rand=False: the top-left token of each cell), ours given the same."""
    run = dict(height=64, width=64, num_inference_steps=5, guidance_scale=7.5)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    tomesd.apply_patch(diffusers_with_tomesd, ratio=0.5, use_rand=False)
    try:
        expected = diffusers_with_tomesd("a fox in the snow", latents=torch.from_numpy(latents), output_type="np",
                                         **run).images
    finally:
        tomesd.remove_patch(diffusers_with_tomesd)
    expected = (expected * 255).round().astype(np.uint8)
    monkeypatch.setattr(token_merging, "destination_choice", lambda cells_y, cells_x, t: np.zeros((cells_y, cells_x),
                                                                                                   np.int64))
    models = load_models(sd1_folder)
    models.unet.token_merging = 0.5
    ours = StableDiffusionPipeline(models, engine=engine)
    images, _ = ours("a fox in the snow", sampler="ddim", latents=latents, progress=False, **run)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    print(f"token merging 0.5 ({engine}): max uint8 difference {difference}")
    assert difference <= 2
    plain = StableDiffusionPipeline(load_models(sd1_folder), engine=engine)
    full, _ = plain("a fox in the snow", sampler="ddim", latents=latents, progress=False, **run)
    assert np.abs(full.astype(int) - expected.astype(int)).max() > 2  # merging changes the picture


def test_the_option_switches_graphs_through_the_module(sd1_folder):
    """token_merging through generate_image on the CPU engine: UNet graphs of their own for the ratio,
    the plain ones back without it, and the ratio in the picture's parameters."""
    import os
    from stable_diffusion.cpu.compiled import graph_folder
    from stable_diffusion.text_to_image import TextToImage
    generator = TextToImage(sd1_folder)
    run = dict(seed=4, num_inference_steps=4, width_height=[64, 64], output_dir=None, progress=False, display_rate=0)

    def picture(**options):
        chunk = generator.generate_image("a red kite", **run, **options)[0].chunks[0]
        return chunk.load_uri_to_image_tensor().tensor, chunk.tags

    plain, tags = picture()
    merged, merged_tags = picture(token_merging=0.5)
    assert "token_merging" not in tags and merged_tags["token_merging"] == 0.5
    assert generator._pipeline.models.unet.token_merging == 0.5
    assert os.path.isdir(os.path.join(graph_folder(sd1_folder), "unet_token_merging_0.5"))
    assert np.abs(merged.astype(int) - plain.astype(int)).max() > 2
    again, _ = picture()
    np.testing.assert_array_equal(again, plain)
