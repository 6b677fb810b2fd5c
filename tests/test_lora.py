"""LoRA files in the layouts people share (kohya/A1111 with LoCon convolutions, PEFT as diffusers saves
it), merged into our weights, against diffusers' load_lora_weights + fuse_lora at the same scale; and
how the three doors ask for them."""
import copy
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import SCHEDULER, VOCAB_DIR
from stable_diffusion.adapters.lora import read_lora
from stable_diffusion.loading import load_models
from stable_diffusion.loading.checkpoint_files import CheckpointError
from stable_diffusion.pipeline import StableDiffusionPipeline
from stable_diffusion.server import serve_request
from stable_diffusion.text_to_image import SERVING_KEYS, TextToImage

KOHYA_UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "proj_in", "proj_out",
                      "ff.net.0.proj", "ff.net.2", "resnets.0.conv1", "resnets.1.conv2", "time_emb_proj")  # LoCon
KOHYA_TEXT_MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")


def low_rank_pair(module, rank, generator):
    weight = module.weight
    out_channels, in_channels = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((rank, in_channels, *kernel), generator=generator) * 0.3
    up = torch.randn((out_channels, rank, *((1, 1) if kernel else ())), generator=generator) * 0.3
    return down, up


def write_kohya_lora(path, reference, rank=4, alpha=2.0, seed=0):
    """kohya's layout: dotted module paths with underscores, lora_down/lora_up/alpha; LoCon 3x3 convs."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, wanted in (("lora_unet_", reference["unet"], KOHYA_UNET_MODULES),
                                  ("lora_te_text_model_", reference["text_encoder"], KOHYA_TEXT_MODULES)):
        for name, module in model.named_modules():
            if name.endswith(wanted) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = low_rank_pair(module, rank, generator)
                state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)
    return path


def write_peft_lora(folder, reference):
    """PEFT's layout, made by peft itself and saved by diffusers (alpha in the file's metadata)."""
    from diffusers import StableDiffusionPipeline as Reference
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(1)
    unet = copy.deepcopy(reference["unet"])
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
    unet.add_adapter(config)
    layers = {k: v * 1.5 for k, v in get_peft_model_state_dict(unet).items()}
    Reference.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, sd1_reference):
    folder = tmp_path_factory.mktemp("loras")
    return {"kohya": write_kohya_lora(str(folder / "kohya_style.safetensors"), sd1_reference),
            "peft": write_peft_lora(str(folder / "peft"), sd1_reference)}


def merge_text_encoder_lora_by_hand(text_encoder, lora_path, scale):
    """W += scale x alpha / rank x up @ down on the torch text encoder's modules named in a kohya file.
    (diffusers 0.42 places kohya text-encoder layers under `text_model.`, which transformers 5's
    CLIPTextModel no longer has: it reports them UNEXPECTED and leaves them out, so its text side is not
    a reference here; its UNet side is.)"""
    from safetensors.torch import load_file
    state = load_file(lora_path)
    modules = {"lora_te_text_model_" + name.replace(".", "_"): module for name, module in text_encoder.named_modules()}
    with torch.no_grad():
        for key in [k for k in state if k.startswith("lora_te_") and k.endswith(".lora_down.weight")]:
            name = key[: -len(".lora_down.weight")]
            down, up = state[key], state[name + ".lora_up.weight"]
            alpha = state[name + ".alpha"].item()
            modules[name].weight += scale * alpha / down.shape[0] * (up @ down)
    return text_encoder


def reference_image(sd1_reference, lora_path, scale, latents, tmp_path):
    from diffusers import PNDMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)
    text_encoder = merge_text_encoder_lora_by_hand(copy.deepcopy(sd1_reference["text_encoder"]), lora_path, scale)
    pipe = Reference(vae=sd1_reference["vae"], text_encoder=text_encoder,
                     tokenizer=tokenizer, unet=copy.deepcopy(sd1_reference["unet"]),
                     scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    state = load_file(lora_path)
    unet_only = {k: v for k, v in state.items() if not k.startswith("lora_te_")}
    if len(unet_only) < len(state):
        lora_path = str(tmp_path / "unet_part.safetensors")
        save_file(unet_only, lora_path)
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora(lora_scale=scale)
    image = pipe("a lighthouse at dusk", height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                 latents=torch.from_numpy(latents), output_type="np").images
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("layout,scale,engine", [("kohya", 0.7, "eager"), ("kohya", 0.7, "inference"),
                                                 ("kohya", 0.7, "inference, lent"), ("kohya", -0.5, "inference, lent"),
                                                 ("peft", 0.8, "eager"), ("peft", 0.8, "inference, lent")])
def test_lora_matches_diffusers(sd1_folder, sd1_reference, lora_files, layout, scale, engine, tmp_path):
    """Merged before the graphs are exported, or ("lent") into copies of the touched weights, lent to
    the plain model's graphs."""
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = reference_image(sd1_reference, lora_files[layout], scale, latents, tmp_path)
    loras = [(lora_files[layout], scale)]
    if engine == "inference, lent":
        ours = StableDiffusionPipeline(load_models(sd1_folder), engine="inference")
        assert ours.use_loras(loras)
    else:
        ours = StableDiffusionPipeline(load_models(sd1_folder, loras=loras), engine=engine)
    images, _ = ours("a lighthouse at dusk", height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                     sampler="plms", latents=latents, progress=False)
    plain, _ = StableDiffusionPipeline(load_models(sd1_folder), engine="eager")(
        "a lighthouse at dusk", height=64, width=64, num_inference_steps=4, guidance_scale=7.5, sampler="plms",
        latents=latents, progress=False)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    change = np.abs(plain.astype(int) - expected.astype(int)).mean()
    print(f"{layout} x {scale} ({engine}): max uint8 difference {difference}; the LoRA moves pixels by {change:.1f}")
    assert difference <= 2
    assert change > 5, "the LoRA barely changes the picture: the comparison would prove little"


def test_deep_cache_with_a_lent_lora(sd1_folder, lora_files):
    """DeepCache's shallow branch has a graph of its own: a LoRA lent to the UNet is lent to it too."""
    run = dict(height=64, width=64, num_inference_steps=5, guidance_scale=7.5, sampler="ddim", seed=2,
               progress=False, deep_cache_interval=3)
    loras = [(lora_files["kohya"], 0.7)]
    lent = StableDiffusionPipeline(load_models(sd1_folder), engine="inference")
    assert lent.use_loras(loras)
    merged = StableDiffusionPipeline(load_models(sd1_folder, loras=loras), engine="eager")
    images, expected = lent("a lighthouse", **run)[0], merged("a lighthouse", **run)[0]
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 2
    assert lent.use_loras([])
    plain = StableDiffusionPipeline(load_models(sd1_folder), engine="eager")("a lighthouse", **run)[0]
    np.testing.assert_allclose(lent("a lighthouse", **run)[0], plain, atol=2)


def test_kohya_file_read_as_layers(lora_files):
    layers, layout = read_lora(lora_files["kohya"])
    assert layout == "kohya"
    components = {component for component, _ in layers}
    assert components == {"unet", "text_encoder"}
    conv = next(layer for (c, m), layer in layers.items() if m.endswith("resnets_0_conv1"))
    assert conv.down.ndim == 4 and conv.down.shape[2:] == (3, 3) and conv.alpha == 2.0


def test_keys_that_match_nothing_are_named(sd1_folder, tmp_path):
    path = str(tmp_path / "elsewhere.safetensors")
    save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4)}, path)
    with pytest.raises(CheckpointError, match="1 of its 1 layers match nothing.*down_blocks_9_attentions_0_proj_in"):
        load_models(sd1_folder, loras=[(path, 1.0)])
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 48, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="the LoRA is for another model"):
        load_models(sd1_folder, loras=[(path, 1.0)])
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(4, 32)}, path)
    with pytest.raises(CheckpointError, match="LoHa"):
        load_models(sd1_folder, loras=[(path, 1.0)])
    save_file({"something.else": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="no LoRA layers|not LoRA layers"):
        load_models(sd1_folder, loras=[(path, 1.0)])


FAST = dict(width_height=[64, 64], num_inference_steps=3, display_rate=0, use_gpu=False, output_dir=None, seed=4,
            progress=False)


def final(documents):
    return documents[0].chunks[0].load_uri_to_image_tensor().tensor


def test_loras_change_between_calls_and_by_prompt_tag(sd1_folder, lora_files, tmp_path, monkeypatch):
    """Other LoRAs on the CPU engine are lent to the loaded graphs (no export); going back to none gives
    the plain image again, and a prompt's <lora:name:w> tag is the same as the option."""
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path / "graphs"))
    monkeypatch.setenv("STABLE_DIFFUSION_LORA_DIR", os.path.dirname(lora_files["kohya"]))
    generator = TextToImage(sd1_folder)
    plain = final(generator.generate_image("a red bicycle", **FAST))
    styled = final(generator.generate_image("a red bicycle", loras=[(lora_files["kohya"], 0.7)], **FAST))
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 5
    tagged = generator.generate_image("a red bicycle <lora:kohya_style:0.7>", **FAST)
    np.testing.assert_array_equal(final(tagged), styled)
    assert tagged[0].tags["loras"] == [["kohya_style.safetensors", 0.7]]
    np.testing.assert_array_equal(final(generator.generate_image("a red bicycle", **FAST)), plain)
    # the LoRAs were lent to the plain model's graphs: no graphs of their own were exported
    folders = sorted(sorted(os.listdir(tmp_path / "graphs" / key)) for key in os.listdir(tmp_path / "graphs")
                     if (tmp_path / "graphs" / key / "text_encoder").is_dir())  # not the attention operator's
    assert folders == [["text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"]]
    from_option = generator.generate_image("a red bicycle", loras=["kohya_style:0.7"], **FAST)
    np.testing.assert_array_equal(final(from_option), styled)
    png = from_option[0].chunks[0].load_uri_to_blob().blob
    assert Image.open(io.BytesIO(png)).info["parameters"].startswith("a red bicycle <lora:kohya_style:0.7>\n")


def test_a_lora_on_a_derived_weight_is_merged_and_exported(sd1_folder, sd1_reference, tmp_path, monkeypatch):
    """The UNet graph holds an upsampler's convolution only as kernels computed from it: a LoRA there
    cannot be lent, so the weights are loaded again with it merged, and graphs of its own exported."""
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path / "graphs"))
    generator = torch.Generator().manual_seed(3)
    conv = sd1_reference["unet"].up_blocks[0].upsamplers[0].conv
    down, up = low_rank_pair(conv, 4, generator)
    path = str(tmp_path / "upsampler.safetensors")
    save_file({"lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight": down,
               "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight": up}, path)
    plain = StableDiffusionPipeline(load_models(sd1_folder), engine="inference")
    assert not plain.use_loras([(path, 1.0)]) and plain.loras == ()
    generator = TextToImage(sd1_folder)
    documents = generator.generate_image("a red bicycle", loras=[(path, 1.0)], **FAST)
    assert generator._pipeline.models.adapters["unet"][0] == os.path.abspath(path)
    eager = StableDiffusionPipeline(load_models(sd1_folder, loras=[(path, 1.0)]), engine="eager")
    images, _ = eager("a red bicycle", height=64, width=64, num_inference_steps=3, sampler="plms", seed=4,
                      progress=False)
    assert np.abs(final(documents).astype(int) - images[0].astype(int)).max() <= 1


def test_served_loras_by_name_only(sd1_folder, lora_files, monkeypatch):
    monkeypatch.setenv("STABLE_DIFFUSION_LORA_DIR", os.path.dirname(lora_files["kohya"]))
    generator = TextToImage(sd1_folder)
    request = dict(width_height=[64, 64], num_inference_steps=2, display_rate=0, seed=1)
    for bad in ([[lora_files["kohya"], 1.0]], [["../kohya_style", 1.0]]):
        with pytest.raises(ValueError, match="not a plain file name"):
            serve_request(generator.generate_image, SERVING_KEYS, "a boat", loras=bad, **request)
    with pytest.raises(ValueError, match="not a plain file name"):
        serve_request(generator.generate_image, SERVING_KEYS, "a boat <lora:/etc/passwd:1>", **request)
    with pytest.raises(ValueError, match="no LoRA called 'missing'.*known: kohya_style"):
        serve_request(generator.generate_image, SERVING_KEYS, "a boat", loras=[["missing", 1.0]], **request)
    served = serve_request(generator.generate_image, SERVING_KEYS, "a boat", loras=[["kohya_style", 0.5]], **request)
    assert served[0].tags["loras"] == [["kohya_style.safetensors", 0.5]]
    monkeypatch.delenv("STABLE_DIFFUSION_LORA_DIR")
    with pytest.raises(ValueError, match="operator sets STABLE_DIFFUSION_LORA_DIR"):
        serve_request(generator.generate_image, SERVING_KEYS, "a boat", loras=[["kohya_style", 0.5]], **request)


def test_hub_run_flags_for_community_models(sd1_folder, lora_files, tmp_path):
    """--lora FILE:WEIGHT (repeated), --embedding, --clip_skip and --vae reach the picture and its PNG."""
    from stable_diffusion.cli import parse_arguments
    from stable_diffusion.module import StableDiffusion
    from stable_diffusion.parameters import read_png_parameters
    embedding = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    argv = ["--text_prompts", "a shiny teapot", "--lora", f"{lora_files['kohya']}:0.6", "--lora", lora_files["peft"],
            "--embedding", str(embedding), "--clip_skip", "2", "--width_height", "64", "64",
            "--num_inference_steps", "2", "--display_rate", "0", "--seed", "3", "--use_gpu", "False",
            "--output_dir", str(tmp_path / "out"), "--vae", os.path.join(sd1_folder, "vae")]
    _, options, loading = parse_arguments(argv, "STABLE_DIFFUSION_MODEL")
    assert options["loras"] == [f"{lora_files['kohya']}:0.6", lora_files["peft"]] and options["clip_skip"] == 2
    module = StableDiffusion(model=sd1_folder)
    (path,) = module.run_cmd(argv)
    assert module.text_to_image.vae == loading["vae"] == os.path.join(sd1_folder, "vae")
    saved, _ = read_png_parameters(path)
    assert saved["clip_skip"] == 2
    assert saved["text_prompts"] == "a shiny teapot <lora:kohya_style:0.6> <lora:pytorch_lora_weights:1>"
