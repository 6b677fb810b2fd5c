"""Image-to-image and inpainting against diffusers' Img2Img and Inpaint pipelines: the same weights, the
same picture, mask and noise (diffusers' random draws replaced by ours, in the order both make them)."""
import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from reference import SCHEDULER, VOCAB_DIR
from stable_diffusion.module import StableDiffusion
from stable_diffusion.pipeline import StableDiffusionPipeline

SIZE = 64
PROMPT = "a watercolor painting of a fox in the snow"


def picture(seed=0):
    """A smooth picture with edges: gradients and a disc."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 1 - x * y], axis=2) * 200 + 30
    rgb[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05] = [220, 40, 60 + 40 * seed]
    return rgb.round().astype(np.uint8)


def mask_picture():
    """White (repainted) on the right half, black (kept) on the left, a grey band across the middle."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    mask[SIZE // 2 - 4:SIZE // 2 + 4, :] = 140  # above half: repainted, as diffusers binarizes
    return mask


@pytest.fixture(scope="module")
def inpainting_reference():
    """The tiny SD1 checkpoint with a 9-channel UNet, as runwayml/stable-diffusion-inpainting has."""
    from diffusers import UNet2DConditionModel
    models = reference.build_reference("sd1", seed=5)
    torch.manual_seed(5)
    models["unet"] = reference.perturb(UNet2DConditionModel(**{**reference.TINY["sd1"]["unet"], "in_channels": 9}), 9)
    return models


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory, inpainting_reference):
    return reference.save_diffusers_folder(inpainting_reference, str(tmp_path_factory.mktemp("tiny-inpainting")))


@pytest.fixture(scope="module")
def ours(sd1_folder, inpainting_folder):
    return {(kind, engine): StableDiffusionPipeline.load(folder, engine=engine)
            for kind, folder in (("sd1", sd1_folder), ("inpainting", inpainting_folder))
            for engine in ("eager", "inference")}


@contextlib.contextmanager
def diffusers_draws(arrays):
    """diffusers' randn_tensor (latent samples and noise) returns `arrays` in turn."""
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint
    queue = list(arrays)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        array = queue.pop(0)
        assert tuple(array.shape) == tuple(shape), (array.shape, shape)
        return torch.from_numpy(array).to(dtype or torch.float32)

    saved = [(m, m.randn_tensor) for m in (vae, img2img, inpaint)]
    for module, _ in saved:
        module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        for module, original in saved:
            module.randn_tensor = original


def our_draws(seed, shapes):
    """What our pipeline draws from its seed, in order: the picture's latent sample, then the noise."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def reference_pipeline(models, sampler, inpaint=False):
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline)
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)
    scheduler = {"plms": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler]
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
    return cls(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
               scheduler=scheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)


def to_uint8(images):
    return (images * 255).round().astype(np.uint8)


def compare(ours_images, expected, label):
    difference = np.abs(ours_images.astype(int) - expected.astype(int)).max()
    print(f"{label}: max uint8 difference {difference}")
    assert difference <= 2, label
    assert expected.std() > 5, "the reference image is flat: the comparison would prove little"


@pytest.mark.parametrize("engine", ["eager", "inference"])
@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_image_to_image_matches_diffusers(ours, sd1_reference, engine, sampler, strength):
    pipeline = ours["sd1", engine]
    seed, batch = 4, 2
    latent = (1, 4, SIZE // 4, SIZE // 4)
    sample, noise = our_draws(seed, [latent, (batch, *latent[1:])])
    with diffusers_draws([sample, noise]):
        expected = reference_pipeline(sd1_reference, sampler)(
            PROMPT, image=Image.fromarray(picture()), strength=strength, num_inference_steps=10, guidance_scale=7.5,
            num_images_per_prompt=batch, output_type="np").images
    images, _ = pipeline(PROMPT, height=SIZE, width=SIZE, batch_size=batch, num_inference_steps=10,
                         guidance_scale=7.5, sampler=sampler, seed=seed, init_image=picture(), strength=strength,
                         progress=False)
    compare(images, to_uint8(expected), f"img2img {engine} {sampler} strength {strength}")


@pytest.mark.parametrize("engine", ["eager", "inference"])
@pytest.mark.parametrize("kind", ["sd1", "inpainting"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_diffusers(ours, sd1_reference, inpainting_reference, engine, kind, strength):
    pipeline = ours[kind, engine]
    models = sd1_reference if kind == "sd1" else inpainting_reference
    seed = 6
    latent = (1, 4, SIZE // 4, SIZE // 4)
    image_sample, noise, masked_sample = our_draws(seed, [latent] * 3)
    if kind == "sd1":  # ours never encodes the masked picture for a 4-channel UNet; diffusers does, unused
        draws = [image_sample, noise, masked_sample]
    elif strength == 1.0:  # pure noise: the picture itself is not encoded
        draws = [image_sample, noise]
    else:
        draws = [image_sample, noise, masked_sample]
    with diffusers_draws(draws):
        expected = reference_pipeline(models, "ddim", inpaint=True)(
            PROMPT, image=Image.fromarray(picture()), mask_image=Image.fromarray(mask_picture()), strength=strength,
            height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=7.5, output_type="np").images
    images, _ = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=7.5, sampler="ddim",
                         seed=seed, init_image=picture(), strength=strength, mask=mask_picture(), progress=False)
    compare(images, to_uint8(expected), f"inpainting {kind} {engine} strength {strength}")


def test_a_single_file_inpainting_checkpoint_is_told_by_its_unet_input(tmp_path, inpainting_reference):
    from safetensors.torch import save_file
    from stable_diffusion.loading import load_single_file
    path = str(tmp_path / "sd-inpainting.safetensors")
    save_file(reference.compvis_state_dict(inpainting_reference), path)
    models = load_single_file(path, configs={**reference.TINY["sd1"], "scheduler": None})  # configs of 4 channels
    assert models.unet.config["in_channels"] == 9
    import paddle
    sample = np.random.default_rng(1).standard_normal((2, 1, 9, 8, 8)).astype(np.float32)
    context = np.random.default_rng(2).standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = inpainting_reference["unet"](torch.from_numpy(sample[0]), 300, torch.from_numpy(context)).sample
    got = models.unet(paddle.to_tensor(sample[0]), 300.0, paddle.to_tensor(context)).numpy()
    assert reference.max_relative_error(got, expected.numpy()) < 1e-4


def test_an_inpainting_checkpoint_needs_a_mask(ours):
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        ours["inpainting", "eager"](PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        ours["inpainting", "eager"](PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, init_image=picture(),
                                    progress=False)


@pytest.fixture(scope="module")
def module(sd1_folder):
    return StableDiffusion(model=sd1_folder)


FAST = dict(num_inference_steps=4, display_rate=0, use_gpu=False, output_dir=None)


def test_image_inputs_through_the_module(module, tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(picture()).save(path)
    from_path = module.generate_image("a fox", init_image=str(path), strength=0.6, seed=1, **FAST)
    from_pil = module.generate_image("a fox", init_image=Image.fromarray(picture()), strength=0.6, seed=1, **FAST)
    from_array = module.generate_image("a fox", init_image=picture(), strength=0.6, seed=1, **FAST)
    images = [d[0].chunks[0].load_uri_to_image_tensor().tensor for d in (from_path, from_pil, from_array)]
    assert images[0].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])
    tags = from_path[0].chunks[0].tags
    assert tags["strength"] == 0.6 and tags["mask"] is False and tags["width"] == SIZE
    inpainted = module.generate_image("a fox", init_image=picture(), mask_image=mask_picture(), seed=1, **FAST)
    assert inpainted[0].chunks[0].tags["mask"] is True
    # No width_height: the picture's own size, rounded down to a multiple of 8.
    odd = np.asarray(Image.fromarray(picture()).resize((75, 70)))
    document = module.generate_image("a fox", init_image=odd, seed=1, **FAST)
    assert document[0].chunks[0].load_uri_to_image_tensor().tensor.shape == (64, 72, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(init_image="missing.png"), "init_image: cannot read 'missing.png'"),
    (dict(init_image=b"not an image at all"), "init_image is not an image that Pillow can read"),
    (dict(init_image=np.zeros((64, 64, 3), np.float32)), "init_image as an array must be uint8"),
    (dict(init_image=picture(), strength=0.0), r"strength must be a number in \(0, 1\]"),
    (dict(init_image=picture(), strength=1.5), r"strength must be a number in \(0, 1\]"),
    (dict(mask_image=mask_picture()), "mask_image needs an init_image"),
    (dict(init_image=picture(), mask_image=np.zeros((32, 64), np.uint8)),
     "mask_image is 64x32 but init_image is 64x64"),
    (dict(init_image=np.zeros((3000, 64, 3), np.uint8)), "init_image is 64x3000: each side must be from 64 to 2048"),
    (dict(init_image=picture(), strength=0.1, num_inference_steps=4), "leaves no step to run"),
])
def test_bad_images_are_refused_before_any_work(module, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        module.generate_image("a fox", **{**FAST, "output_dir": str(tmp_path / "never"), **kwargs})
    assert not os.path.exists(tmp_path / "never")


def test_a_truncated_file_is_refused(module, tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(picture()).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="init_image is a truncated or damaged image|init_image is not an image that Pillow can read"):
        module.generate_image("a fox", init_image=str(path), **FAST)
