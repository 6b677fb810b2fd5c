"""The request budget (budget.py) and the generation parameters kept in every PNG (parameters.py)."""
import os

import numpy as np
import pytest
from PIL import Image

from stable_diffusion.budget import LIMITS, RequestBudget
from stable_diffusion.module import StableDiffusion
from stable_diffusion.parameters import format_parameters, parse_parameters, read_png_parameters

FAST = dict(width_height=[72, 64], num_inference_steps=4, use_gpu=False, display_rate=0)


@pytest.fixture(scope="module")
def module(sd1_folder):
    return StableDiffusion(model=sd1_folder)


@pytest.fixture
def no_limits_set(monkeypatch):
    for variable, _, _ in LIMITS.values():
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_unlimited_unless_set_and_the_served_defaults(no_limits_set):
    assert RequestBudget.from_environment() == RequestBudget()
    served = RequestBudget.from_environment(served=True)
    assert served == RequestBudget(768 * 768, 4, 150, 13.2)
    served.check(512, 512, 1, 50)  # SD's default request fits
    no_limits_set.setenv("STABLE_DIFFUSION_MAX_IMAGES", "16")
    assert RequestBudget.from_environment(served=True).max_images == 16
    assert RequestBudget.from_environment().max_images == 16
    no_limits_set.setenv("STABLE_DIFFUSION_MAX_WORK", "-1")
    with pytest.raises(ValueError, match="STABLE_DIFFUSION_MAX_WORK='-1' is not a positive number"):
        RequestBudget.from_environment()


@pytest.mark.parametrize("request_, limit, figure", [
    ((2048, 2048, 16, 1), "STABLE_DIFFUSION_MAX_PIXELS", "4194304"),
    ((512, 512, 8, 2), "STABLE_DIFFUSION_MAX_IMAGES", "is 8"),
    ((512, 512, 1, 1000), "STABLE_DIFFUSION_MAX_STEPS", "is 1000"),
    ((768, 768, 4, 50), "STABLE_DIFFUSION_MAX_WORK", "117.96"),
])
def test_over_budget_names_the_limit_the_figure_and_the_variable(no_limits_set, request_, limit, figure):
    with pytest.raises(ValueError, match="over the server's budget") as caught:
        RequestBudget.from_environment(served=True).check(*request_)
    assert limit in str(caught.value) and figure in str(caught.value)


def test_the_python_api_keeps_the_limits_set_in_the_environment(module, no_limits_set, tmp_path):
    no_limits_set.setenv("STABLE_DIFFUSION_MAX_STEPS", "3")
    with pytest.raises(ValueError, match="STABLE_DIFFUSION_MAX_STEPS"):
        module.generate_image("a boat", output_dir=str(tmp_path / "never"), **FAST)
    assert not os.path.exists(tmp_path / "never")
    picture = np.full((64, 72, 3), 200, np.uint8)  # image-to-image runs steps x strength: 2 of 4
    module.generate_image("a boat", init_image=picture, strength=0.5, output_dir=None, **FAST)


def test_format_and_parse_are_inverse():
    tags = {"seed": 7, "steps": 25, "sampler": "dpmpp_2m_karras", "guidance_scale": 5.0,
            "negative_prompt": "blurry, dark", "width": 64, "height": 72, "eta": 0.25, "strength": 0.6}
    text = format_parameters("a red boat, on a lake", tags, "demo", batch_size=2, batch_position=1)
    assert text.splitlines()[0] == "a red boat, on a lake"
    options, model = parse_parameters(text)
    assert model == "demo"
    assert options == {"text_prompts": "a red boat, on a lake", "negative_prompt": "blurry, dark",
                       "num_inference_steps": 25, "guidance_scale": 5.0, "seed": 7, "width_height": [64, 72],
                       "eta": 0.25, "strength": 0.6, "batch_size": 2, "sampler": "dpmpp_2m_karras"}


def test_parses_what_automatic1111_writes():
    # An A1111 1.10 infotext: Karras as its own "Schedule type", quoted values with commas, extra keys.
    text = ("masterpiece, (best quality:1.2), a castle\nwith a moat\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567, Size: 512x768, "
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, '
            'Lora hashes: "add_detail: 7c6bad76eb54, more: 1234", Version: v1.10.1')
    options, model = parse_parameters(text)
    assert options["text_prompts"] == "masterpiece, (best quality:1.2), a castle\nwith a moat"
    assert options["negative_prompt"] == "lowres, bad anatomy"
    assert options["sampler"] == "dpmpp_2m_karras" and options["num_inference_steps"] == 28
    assert options["guidance_scale"] == 7.0 and options["seed"] == 1234567
    assert options["width_height"] == [512, 768] and options["strength"] == 0.5
    assert model == "v1-5-pruned-emaonly"
    assert parse_parameters("just a prompt") == ({"text_prompts": "just a prompt"}, None)
    with pytest.raises(ValueError, match="sampler 'DPM\\+\\+ SDE' has no counterpart here"):
        parse_parameters("a\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1")


def test_every_image_keeps_its_parameters_and_hub_run_from_png_makes_it_again(module, tmp_path):
    first = tmp_path / "first"
    document = module.generate_image("a lighthouse", seed=12, negative_prompt="fog", sampler="euler",
                                     output_dir=str(first), **FAST)[0]
    (path,) = [p for p in document.tags["files"]]
    options, _ = read_png_parameters(path)
    assert options["seed"] == 12 and options["sampler"] == "euler" and options["negative_prompt"] == "fog"
    returned = document.chunks[0].load_uri_to_blob().blob
    import io
    assert "Seed: 12" in Image.open(io.BytesIO(returned)).info["parameters"]  # the served data too

    again = tmp_path / "again"
    (made,) = module.run_cmd(["--from_png", path, "--output_dir", str(again), "--use_gpu", "0",
                              "--display_rate", "0"])
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(path)))
    (other,) = module.run_cmd(["--from_png", path, "--seed", "13", "--output_dir", str(again), "--use_gpu", "0"])
    assert "seed13" in os.path.basename(other)  # a flag beside --from_png wins
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(path)))

    from_python = module.generate_image(**module.parameters_from_png(path), output_dir=None, use_gpu=False)
    np.testing.assert_array_equal(from_python[0].chunks[0].load_uri_to_image_tensor().tensor,
                                  np.asarray(Image.open(path).convert("RGB")))


def test_a_png_without_parameters_is_refused(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="has no 'parameters' text chunk"):
        read_png_parameters(str(path))
    with pytest.raises(ValueError, match="could not be read as an image"):
        read_png_parameters(str(tmp_path / "missing.png"))


def test_every_sampler_has_an_a1111_name():
    from stable_diffusion.parameters import A1111_SAMPLERS
    from stable_diffusion.samplers import SAMPLERS
    assert set(A1111_SAMPLERS) == set(SAMPLERS)


def test_clip_skip_cutoff_and_unipc_survive_the_round_trip():
    tags = {"steps": 10, "sampler": "unipc", "guidance_scale": 7.5, "seed": 3, "width": 64, "height": 64,
            "clip_skip": 2, "guidance_cutoff": 0.4, "token_merging": 0.5}
    text = format_parameters("a cat <lora:style:0.8>", tags, "demo")
    assert "Sampler: UniPC" in text and "Clip skip: 2" in text and "Guidance cutoff: 0.4" in text
    assert "Token merging ratio: 0.5" in text  # A1111's own key
    options, _ = parse_parameters(text)
    assert (options["sampler"], options["clip_skip"], options["guidance_cutoff"]) == ("unipc", 2, 0.4)
    assert options["token_merging"] == 0.5
    assert options["text_prompts"] == "a cat <lora:style:0.8>"
