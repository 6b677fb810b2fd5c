"""generate_image through the module facade: arguments, results, files, seeds."""
import os
import threading

import numpy as np
import paddle
import pytest
from docarray import DocumentArray

from stable_diffusion.module import StableDiffusion
from stable_diffusion.text_to_image import TextToImage

FAST = dict(width_height=[72, 64], num_inference_steps=3, display_rate=1, use_gpu=False)


@pytest.fixture(scope="module")
def module(sd1_folder):
    return StableDiffusion(model=sd1_folder)


def final_image(document, j=0):
    return document.chunks[j].load_uri_to_image_tensor().tensor


def test_document_array_shape_tags_and_frames(module, tmp_path):
    da = module.generate_image(["a lighthouse at dusk", "a bowl of fruit"], style="oil painting", seed=11,
                               batch_size=2, output_dir=str(tmp_path), **FAST)
    assert isinstance(da, DocumentArray) and len(da) == 2
    prompt_doc = da[0]
    assert prompt_doc.tags["prompt"] == "a lighthouse at dusk,oil painting"
    assert len(prompt_doc.chunks) == 3  # two images and the merged grid
    for j in range(2):
        image_doc = prompt_doc.chunks[j]
        assert image_doc.tags["image idx"] == j
        assert {"prompt", "seed", "steps", "sampler", "guidance_scale"} <= set(image_doc.tags)
        assert image_doc.tags["seed"] == 11 and image_doc.tags["steps"] == 3 and image_doc.tags["sampler"] == "plms"
        assert image_doc.uri.startswith("data:image/png;base64,")
        frames = image_doc.chunks
        assert len(frames) == 4  # PLMS runs steps + 1 model calls: frames at 1, 2, 3 and the final
        assert frames[-1].uri == image_doc.uri
        assert frames[0].load_uri_to_image_tensor().tensor.shape == (64, 72, 3)
    merged = prompt_doc.chunks[-1]
    assert merged.tags["image idx"] == "merged"
    assert merged.load_uri_to_image_tensor().tensor.shape == (64, 144, 3)
    assert prompt_doc.uri == merged.uri
    assert not np.array_equal(final_image(prompt_doc, 0), final_image(prompt_doc, 1))
    gif = str(tmp_path / "process.gif")
    merged.chunks.save_gif(gif)
    with open(gif, "rb") as f:
        assert f.read(6) in (b"GIF87a", b"GIF89a")
    merged.chunks.plot_image_sprites(str(tmp_path / "sprites.png"))
    assert os.path.getsize(tmp_path / "sprites.png") > 0
    files = sorted(os.listdir(tmp_path))
    assert sum(name.endswith("_0.png") for name in files) == 2 and sum("merged" in name for name in files) == 2
    assert not [name for name in files if name.startswith(".partial")]


def test_base64_round_trip(module):
    da = module.generate_image("a tree", seed=3, output_dir=None, **FAST)
    back = DocumentArray.from_base64(da.to_base64())
    np.testing.assert_array_equal(final_image(back[0]), final_image(da[0]))


def test_seed_reproduces_and_differs(module):
    first = final_image(module.generate_image("a tree", seed=0, output_dir=None, **FAST)[0])
    paddle.seed(1234)
    np.random.seed(99)  # global RNG state must not matter
    again = final_image(module.generate_image("a tree", seed=0, output_dir=None, **FAST)[0])
    other = final_image(module.generate_image("a tree", seed=1, output_dir=None, **FAST)[0])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_seed_is_independent_of_concurrent_requests(module):
    alone = final_image(module.generate_image("a boat", seed=5, sampler="euler_a", output_dir=None, **FAST)[0])
    results = {}

    def request(seed):
        da = module.generate_image("a boat", seed=seed, sampler="euler_a", output_dir=None, **FAST)
        results[seed] = final_image(da[0])

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (5, 6, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(results[5], alone)


def test_random_seed_is_recorded(module):
    da = module.generate_image("a cat", seed=None, output_dir=None, **FAST)
    seed = da[0].chunks[0].tags["seed"]
    again = module.generate_image("a cat", seed=int(seed), output_dir=None, **FAST)
    np.testing.assert_array_equal(final_image(da[0]), final_image(again[0]))


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "a/b\\c", "..", "x" * 500, "东京 ☃ night"])
def test_prompt_file_names_stay_inside_output_dir(module, tmp_path, prompt):
    out = tmp_path / "out"
    da = module.generate_image(prompt, seed=1, output_dir=str(out), **FAST)
    files = da[0].tags["files"]
    assert len(files) == 1
    for path in files:
        assert os.path.dirname(os.path.abspath(path)) == str(out)
        assert len(os.path.basename(path)) < 200
    assert sorted(os.listdir(tmp_path)) == ["out"]
    da2 = module.generate_image(prompt, seed=1, output_dir=str(out), **FAST)
    assert da2[0].tags["files"] != files and len(os.listdir(out)) == 2  # a second run never overwrites


def test_given_latents_are_used(module, sd1_folder):
    shape = TextToImage(sd1_folder).load_pipeline(False, False).latent_shape(1, 64, 72)
    latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    a = module.generate_image("a road", latents=latents.tolist(), seed=1, output_dir=None, **FAST)
    b = module.generate_image("a road", latents=latents, seed=2, output_dir=None, **FAST)
    np.testing.assert_array_equal(final_image(a[0]), final_image(b[0]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(width_height=[65, 64]), "multiples of 8"),
    (dict(width_height=[4096, 64]), "between 64 and 2048"),
    (dict(width_height=512), "two integers"),
    (dict(text_prompts=""), "non-empty string"),
    (dict(text_prompts=["ok", 3]), "non-empty string"),
    (dict(text_prompts=[]), "non-empty"),
    (dict(sampler="k_lms"), "unknown sampler 'k_lms'; choose one of plms"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1"),
    (dict(batch_size=0), "batch_size must be an integer from 1"),
    (dict(batch_size="2"), "batch_size must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(guidance_scale="high"), "guidance_scale must be a number"),
    (dict(eta=2.0), "eta must be a number from 0 to 1"),
    (dict(negative_prompt=5), "negative_prompt must be a string"),
    (dict(display_rate=-1), "display_rate must be an integer >= 0"),
    (dict(token_merging=0.9), r"token_merging must be a fraction of the tokens in \(0, 0.75\]"),
    (dict(token_merging="half"), "token_merging must be a fraction"),
    (dict(latents=[[1.0, 2.0]]), r"latents must have shape \[1, 4, 16, 18\]"),
])
def test_bad_input_names_the_fix(module, tmp_path, kwargs, message):
    arguments = {"text_prompts": "a dog", **FAST, "output_dir": str(tmp_path / "never"), **kwargs}
    with pytest.raises(ValueError, match=message):
        module.generate_image(**arguments)
    assert not os.path.exists(tmp_path / "never")


def test_model_from_environment_variable(sd1_folder, monkeypatch):
    monkeypatch.setenv("STABLE_DIFFUSION_MODEL", sd1_folder)
    assert TextToImage().model_source == sd1_folder
    monkeypatch.delenv("STABLE_DIFFUSION_MODEL")
    assert TextToImage().model_source == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_cached_graph_loads_without_eager_weights(module, sd1_folder):
    before = final_image(module.generate_image("a kite", seed=2, output_dir=None, **FAST)[0])
    fresh = TextToImage(sd1_folder)
    pipeline = fresh.load_pipeline(use_gpu=False, enable_fp16=False)
    models = pipeline.models
    for model in (models.text_encoder, models.unet, models.vae):  # the VAE's unused encoder included
        held = [name for name, p in model.named_parameters() if p._is_initialized()]
        # The token lookup stays eager: textual-inversion vectors replace token embeddings there.
        assert held == (["embeddings.token_embedding.weight"] if model is models.text_encoder else [])
    after = final_image(fresh.generate_image("a kite", seed=2, output_dir=None, progress=False, **FAST)[0])
    np.testing.assert_array_equal(before, after)


def test_eager_engine_gives_the_same_image(module, sd1_folder):
    compiled = final_image(module.generate_image("a kite", seed=2, output_dir=None, **FAST)[0])
    eager = StableDiffusion(model=sd1_folder, cpu_engine="eager")
    image = final_image(eager.generate_image("a kite", seed=2, output_dir=None, **FAST)[0])
    assert np.abs(compiled.astype(int) - image.astype(int)).max() <= 1
