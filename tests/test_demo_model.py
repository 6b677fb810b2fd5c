"""The shipped demo model: loaded by the same code as any SD checkpoint, and its pictures show what the
prompt names (retrieval among every emoji it was trained on, tools/emoji_retrieval.py)."""
import os

import numpy as np
import pytest

from stable_diffusion.loading import load_models, resolve_source
from stable_diffusion.loading.sources import DEMO_MODEL_DIR
from stable_diffusion.module import StableDiffusion
from stable_diffusion.pipeline import StableDiffusionPipeline
from tools.emoji_retrieval import PROMPTS, load_references, rank_of

REFERENCES = os.path.join(os.path.dirname(__file__), "data", "emoji_thumbnails.npz")
# The first six of bench/demo_quality.py's list, with its seeds (it measures all 56: top-5 70%); a
# regression in the tokenizer, guidance, sampler or engine loses them.
NAMED = PROMPTS[:6]


@pytest.fixture(scope="module")
def references():
    return load_references(REFERENCES)


@pytest.fixture(scope="module")
def demo():
    return StableDiffusion(model="demo")


def picture(module, prompt, seed, **options):
    document = module.generate_image(prompt, seed=seed, output_dir=None, display_rate=0, use_gpu=False, **options)
    return document[0].chunks[0].load_uri_to_image_tensor().tensor


def test_the_demo_model_is_a_small_stable_diffusion_in_a_diffusers_folder():
    assert resolve_source("demo") == DEMO_MODEL_DIR
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(DEMO_MODEL_DIR)
               for name in names)
    assert size <= 30 * 2 ** 20
    assert os.path.isfile(os.path.join(DEMO_MODEL_DIR, "LICENSE.md"))
    models = load_models("demo")
    assert models.unet.config["block_out_channels"] == [32, 64, 128]
    assert models.vae.downsampling_factor == 4 and models.text_encoder.config["hidden_size"] == 128
    pipeline = StableDiffusionPipeline(models, engine="eager")
    assert pipeline.native_size == (64, 64)


def test_defaults_come_from_the_model_folder(demo):
    document = demo.generate_image("red apple", seed=0, output_dir=None, display_rate=0, use_gpu=False)[0]
    tags = document.chunks[0].tags
    image = document.chunks[0].load_uri_to_image_tensor().tensor
    assert image.shape == (64, 64, 3)
    from stable_diffusion.text_to_image import read_generation_defaults
    defaults = read_generation_defaults(DEMO_MODEL_DIR)
    assert tags["steps"] == defaults["num_inference_steps"] and tags["sampler"] == defaults["sampler"]
    assert tags["guidance_scale"] == defaults["guidance_scale"]


@pytest.mark.parametrize("name", NAMED)
def test_a_named_emoji_is_drawn(demo, references, name):
    names, thumbnails = references
    rank = rank_of(picture(demo, name, seed=PROMPTS.index(name)), thumbnails, names.index(name))
    print(f"{name}: rank {rank + 1} of {len(names)}")
    assert rank < 5, f"{name!r} drew a picture whose nearest emoji leaves it at rank {rank + 1} of {len(names)}"


@pytest.mark.parametrize("name", NAMED)
def test_the_fast_preset_still_draws_the_named_emoji(demo, references, name):
    """fast=True: UniPC's 10 steps, a full UNet pass every 2nd (FAST_PRESET), in place of the model's
    25 guided DPM++ steps."""
    names, thumbnails = references
    document = demo.generate_image(name, seed=PROMPTS.index(name), output_dir=None, display_rate=0, use_gpu=False,
                                   fast=True)[0]
    tags = document.chunks[0].tags
    assert (tags["sampler"], tags["steps"], tags["deep_cache_interval"]) == ("unipc", 10, 2)
    rank = rank_of(document.chunks[0].load_uri_to_image_tensor().tensor, thumbnails, names.index(name))
    print(f"{name} (fast): rank {rank + 1} of {len(names)}")
    assert rank < 5


def test_without_the_prompt_the_named_emoji_are_not_drawn(demo, references):
    """The control for the test above: the same seeds with the prompt's embeddings replaced by the
    empty prompt's leave the named emoji far down the ranking."""
    names, thumbnails = references
    from stable_diffusion.text_to_image import read_generation_defaults
    pipeline = demo.text_to_image.load_pipeline(False, False)
    empty = pipeline.encode_text([""])
    hits = 0
    for name in NAMED:
        images, _ = pipeline(prompt_embeds=empty, negative_prompt_embeds=empty, height=64, width=64,
                             seed=PROMPTS.index(name),
                             progress=False, **read_generation_defaults(DEMO_MODEL_DIR))
        hits += rank_of(images[0], thumbnails, names.index(name)) < 5
    assert hits <= 1


def test_precomputed_prompt_embeddings_give_the_prompts_picture(demo):
    pipeline = demo.text_to_image.load_pipeline(False, False)
    options = dict(height=64, width=64, num_inference_steps=4, guidance_scale=5.0, sampler="ddim", seed=3,
                   progress=False)
    from_text, _ = pipeline("rocket", **options)
    prompt_embeds, negative = pipeline.encode_prompt("rocket", "", guided=True)
    from_embeddings, _ = pipeline(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, **options)
    np.testing.assert_array_equal(from_text, from_embeddings)


@pytest.fixture(scope="module")
def tangerine(demo):
    """A picture the demo model draws right (rank 1 among the emoji with the bench's seed)."""
    return picture(demo, "tangerine", seed=PROMPTS.index("tangerine"))


def test_image_to_image_keeps_the_picture_at_low_strength_and_follows_the_prompt_at_full(demo, references,
                                                                                         tangerine):
    names, thumbnails = references
    source, target = names.index("tangerine"), names.index("robot face")
    for seed in (0, 1):
        light = picture(demo, "robot face", seed=seed, init_image=tangerine, strength=0.3)
        full = picture(demo, "robot face", seed=seed, init_image=tangerine, strength=1.0)
        # Light: still nearer the input's emoji than the prompt's, and nearer the input's pixels.
        assert rank_of(light, thumbnails, source) < rank_of(light, thumbnails, target)
        assert np.abs(light.astype(float) - tangerine).mean() < np.abs(full.astype(float) - tangerine).mean()
        # Full: the prompt's emoji, the input's gone.
        assert rank_of(full, thumbnails, target) < 5 and rank_of(full, thumbnails, source) > 100


def test_inpainting_repaints_the_masked_half_and_keeps_the_other(demo, tangerine):
    """The demo model's UNet has 4 input channels: diffusers' legacy inpainting, the known latents
    blended back at every step; the kept half differs from the input by the VAE's own error only
    (about 10 levels here), the repainted half by far more."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # white: repainted
    for seed in (0, 1):
        out = picture(demo, "robot face", seed=seed, init_image=tangerine, mask_image=mask, strength=1.0)
        difference = np.abs(out.astype(float) - tangerine)
        kept, repainted = difference[:, 32:].mean(), difference[:, :32].mean()
        assert kept < 20 and repainted > 3 * kept, (kept, repainted)
