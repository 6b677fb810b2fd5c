"""SD 2.x single files (OpenCLIP text encoder) against diffusers' from_single_file; the prediction type
where the weights cannot tell it; a VAE of its own; and what a file that is not an SD 1.x/2.x
checkpoint is told to be."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference import SCHEDULER, TINY, build_reference, compvis_state_dict, max_relative_error, perturb, save_diffusers_folder
from stable_diffusion.loading import load_models, load_single_file
from stable_diffusion.loading.checkpoint_files import CheckpointError
from stable_diffusion.pipeline import StableDiffusionPipeline

SD2_CONFIGS = {**TINY["sd2"], "scheduler": None}
OPEN_CLIP = "cond_stage_model.model."


def open_clip_state_dict(text_encoder, extra_layers=0, seed=0):
    """transformers' CLIP text encoder written as SD 2.x files hold it (OpenCLIP names, q/k/v packed in
    in_proj), with `extra_layers` more blocks at the end that SD 2.x does not use."""
    state = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    layers = text_encoder.config.num_hidden_layers
    out = {OPEN_CLIP + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           OPEN_CLIP + "positional_embedding": state["embeddings.position_embedding.weight"],
           OPEN_CLIP + "ln_final.weight": state["final_layer_norm.weight"],
           OPEN_CLIP + "ln_final.bias": state["final_layer_norm.bias"],
           OPEN_CLIP + "text_projection": torch.randn(width, width), OPEN_CLIP + "logit_scale": torch.tensor(4.6)}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    generator = torch.Generator().manual_seed(seed)
    for i in range(layers + extra_layers):
        source = f"encoder.layers.{min(i, layers - 1)}."
        block = f"{OPEN_CLIP}transformer.resblocks.{i}."
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                value = state[f"{source}{ours}.{kind}"]
                out[f"{block}{theirs}.{kind}"] = value if i < layers else torch.randn(value.shape, generator=generator)
        for kind in ("weight", "bias"):
            packed = torch.cat([state[f"{source}self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")])
            out[f"{block}attn.in_proj_{kind}"] = packed if i < layers else torch.randn(packed.shape, generator=generator)
    return out


def sd2_file_state(reference, extra_layers=0):
    state = {k: v for k, v in compvis_state_dict(reference).items() if not k.startswith("cond_stage_model.")}
    return {**state, **open_clip_state_dict(reference["text_encoder"], extra_layers)}


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    reference = build_reference("sd2", seed=3)
    folder = save_diffusers_folder(reference, str(tmp_path_factory.mktemp("tiny-sd2-config")))
    with open(os.path.join(folder, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "pad_token": "!"}, f)  # as SD 2.x's tokenizer
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:  # as SD 2.1's (768 px, v)
        json.dump({**SCHEDULER, "prediction_type": "v_prediction"}, f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:  # what from_single_file reads its parts from
        json.dump({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
                   "requires_safety_checker": False}, f)
    files = tmp_path_factory.mktemp("sd2-files")
    path = str(files / "v2-tiny.safetensors")
    save_file(sd2_file_state(reference), path)
    with_unused_layer = str(files / "v2-tiny-25.safetensors")
    save_file(sd2_file_state(reference, extra_layers=1), with_unused_layer)
    return reference, folder, path, with_unused_layer


def test_sd2_single_file_matches_diffusers(sd2):
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    reference, config_folder, path, _ = sd2
    theirs = Reference.from_single_file(path, config=config_folder, local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    models = load_single_file(path, configs=SD2_CONFIGS)
    assert models.scheduler_config["prediction_type"] == theirs.scheduler.config.prediction_type == "v_prediction"
    assert models.tokenizer.pad_id == 0  # "!", as SD 2.x pads
    ours = StableDiffusionPipeline(models, engine="eager")
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    prompt = "a snowy mountain village"
    expected = theirs(prompt, height=64, width=64, num_inference_steps=5, guidance_scale=7.5,
                      latents=torch.from_numpy(latents), output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    images, _ = ours(prompt, height=64, width=64, num_inference_steps=5, guidance_scale=7.5, sampler="ddim",
                     latents=latents, progress=False)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    print(f"SD 2.x single file, v-prediction, ddim: max uint8 difference {difference}")
    assert difference <= 2 and expected.std() > 5
    ids = np.array([models.tokenizer(prompt)], np.int64)
    with torch.no_grad():
        context = reference["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    assert max_relative_error(models.text_encoder(__import__("paddle").to_tensor(ids)).numpy(), context) < 1e-4


def test_unused_last_layer_is_dropped(sd2):
    _, _, path, with_unused_layer = sd2
    a, b = (load_single_file(p, configs=SD2_CONFIGS) for p in (path, with_unused_layer))
    for (name, pa), (_, pb) in zip(a.text_encoder.named_parameters(), b.text_encoder.named_parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=name)


def test_prediction_type_where_the_weights_cannot_tell(sd2, tmp_path):
    reference, _, path, _ = sd2
    copy = tmp_path / "v2-base.safetensors"
    copy.write_bytes(open(path, "rb").read())
    assert load_single_file(str(copy), configs=SD2_CONFIGS).scheduler_config["prediction_type"] == "v_prediction"
    (tmp_path / "v2-base.yaml").write_text("model:\n  params:\n    timesteps: 1000\n")  # A1111's config, no "v"
    assert load_single_file(str(copy), configs=SD2_CONFIGS).scheduler_config["prediction_type"] == "epsilon"
    (tmp_path / "v2-base.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_single_file(str(copy), configs=SD2_CONFIGS).scheduler_config["prediction_type"] == "v_prediction"
    asked = load_single_file(str(copy), configs=SD2_CONFIGS, prediction_type="epsilon")
    assert asked.scheduler_config["prediction_type"] == "epsilon"
    ckpt = str(tmp_path / "512-base-ema.ckpt")
    torch.save({"state_dict": sd2_file_state(reference), "global_step": 875000}, ckpt)  # SD 2.0 base's step count
    assert load_single_file(ckpt, configs=SD2_CONFIGS).scheduler_config["prediction_type"] == "epsilon"
    inpainting = sd2_file_state(reference)
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(32, 9, 3, 3)  # + mask + masked picture
    save_file(inpainting, str(tmp_path / "512-inpainting-ema.safetensors"))
    models = load_single_file(str(tmp_path / "512-inpainting-ema.safetensors"), configs=SD2_CONFIGS)
    assert models.unet.config["in_channels"] == 9 and models.scheduler_config["prediction_type"] == "epsilon"
    structure_only = ("text_encoder", "unet", "vae")  # SD 2.1's full-size configs, no weights read into them
    assert load_single_file(ckpt, skip_weights=structure_only).unet.config["sample_size"] == 64  # 512 px base
    assert load_single_file(str(copy), skip_weights=structure_only).unet.config["sample_size"] == 96  # 768 px v


@pytest.fixture(scope="module")
def other_vae(sd1_reference, tmp_path_factory):
    """A VAE with weights of its own (as vae-ft-mse-840000 beside SD 1.5), in three layouts."""
    from diffusers import AutoencoderKL
    torch.manual_seed(9)
    vae = perturb(AutoencoderKL(**TINY["sd1"]["vae"]), 9)
    folder = tmp_path_factory.mktemp("vae")
    compvis = {k[len("first_stage_model."):]: v for k, v in
               compvis_state_dict({"unet": sd1_reference["unet"], "vae": vae}).items()
               if k.startswith("first_stage_model.")}
    save_file(compvis, str(folder / "vae-ft-mse.safetensors"))
    torch.save({"state_dict": compvis, "global_step": 840000}, str(folder / "vae-ft-mse.ckpt"))
    vae.save_pretrained(str(folder / "diffusers_vae"), safe_serialization=True)
    return vae, {"compvis": str(folder / "vae-ft-mse.safetensors"), "compvis_ckpt": str(folder / "vae-ft-mse.ckpt"),
                 "folder": str(folder / "diffusers_vae"),
                 "diffusers_file": str(folder / "diffusers_vae" / "diffusion_pytorch_model.safetensors")}


@pytest.mark.parametrize("layout", ["compvis", "compvis_ckpt", "folder", "diffusers_file"])
def test_a_vae_of_its_own(sd1_folder, other_vae, layout):
    import paddle
    vae, paths = other_vae
    models = load_models(sd1_folder, vae=paths[layout])
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).sample.numpy()
    assert max_relative_error(models.vae.decode(paddle.to_tensor(latents)).numpy(), expected) < 1e-4
    assert models.adapters == {"vae": (os.path.abspath(paths[layout]),)}


def test_vae_swap_whole_image_and_cpu_graphs(sd1_folder, sd1_reference, other_vae, tmp_path, monkeypatch):
    from diffusers import PNDMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    from transformers import CLIPTokenizer
    from reference import VOCAB_DIR
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    vae, paths = other_vae
    tokenizer = CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)
    theirs = Reference(vae=vae, text_encoder=sd1_reference["text_encoder"], tokenizer=tokenizer,
                       unet=sd1_reference["unet"], scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None,
                       feature_extractor=None, requires_safety_checker=False)
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = theirs("a harbour", height=64, width=64, num_inference_steps=3, latents=torch.from_numpy(latents),
                      output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    run = dict(height=64, width=64, num_inference_steps=3, sampler="plms", latents=latents, progress=False)
    swapped, _ = StableDiffusionPipeline.load(sd1_folder, vae=paths["compvis"])("a harbour", **run)
    plain, _ = StableDiffusionPipeline.load(sd1_folder)("a harbour", **run)
    assert np.abs(swapped.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(plain.astype(int) - expected.astype(int)).mean() > 5  # not the model's own VAE's picture


def write(path, tensors):
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, path)
    return path


@pytest.mark.parametrize("keys,message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "is a LoRA: give it as loras="),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "is a VAE alone: give it as vae="),
    ({"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (6, 2),
      "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "SDXL checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (6, 2)}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.qkv.weight": (6, 2)}, "FLUX"),
    ({"emb_params": (2, 768)}, "textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}, "InstructPix2Pix"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "has no text encoder"),
])
def test_what_a_file_is_when_it_is_not_sd(tmp_path, keys, message):
    path = write(str(tmp_path / "file.safetensors"), keys)
    with pytest.raises(CheckpointError, match=message):
        load_single_file(path)
