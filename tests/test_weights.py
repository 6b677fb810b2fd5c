"""Loading real checkpoint formats, safely, with errors that say what to fix."""
import os
import pickle
import shutil
import zipfile

import numpy as np
import paddle
import pytest
import torch
from safetensors.torch import save_file

from reference import TINY, compvis_state_dict, max_relative_error, to_numpy
from stable_diffusion.loading.checkpoint_files import CheckpointError, read_state_dict
from stable_diffusion.loading import load_models, load_single_file

SD1_CONFIGS = {**TINY["sd1"], "scheduler": None}


def test_compvis_table_agrees_with_diffusers_converter(sd1_reference):
    """The single file the tests write must be what diffusers itself reads as these weights."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    state = compvis_state_dict(sd1_reference)
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, dict(sd1_reference["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(state, dict(sd1_reference["vae"].config)),
    }
    for name, model in [("unet", sd1_reference["unet"]), ("vae", sd1_reference["vae"])]:
        expected = model.state_dict()
        assert set(converted[name]) == set(expected)
        for key, value in expected.items():
            assert torch.equal(converted[name][key].reshape(value.shape), value), key
    clip = convert_ldm_clip_checkpoint(state)
    for key, value in sd1_reference["text_encoder"].state_dict().items():
        if not key.endswith("position_ids"):
            assert torch.equal(clip["text_model." + key], value), key


@pytest.fixture(scope="module")
def compvis_files(tmp_path_factory, sd1_reference):
    folder = tmp_path_factory.mktemp("compvis")
    state = compvis_state_dict(sd1_reference)
    safetensors_path = str(folder / "model.safetensors")
    save_file(state, safetensors_path)
    # A full training checkpoint: the state dict beside optimizer state and other picklable values.
    ckpt_path = str(folder / "model.ckpt")
    torch.save({"state_dict": state,
                "global_step": 470000, "epoch": 6, "optimizer_states": [{"lr": 1e-4, "state": {}}]}, ckpt_path)
    return safetensors_path, ckpt_path


@pytest.mark.parametrize("which", [0, 1], ids=["safetensors", "ckpt"])
def test_single_file_matches_reference(compvis_files, sd1_reference, which):
    models = load_single_file(compvis_files[which], configs=SD1_CONFIGS)
    ids = np.array([models.tokenizer("a castle on a hill")], dtype=np.int64)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        context = sd1_reference["text_encoder"](torch.from_numpy(ids)).last_hidden_state
        unet_out = sd1_reference["unet"](torch.from_numpy(latents), 500, context).sample
        image = sd1_reference["vae"].decode(torch.from_numpy(latents)).sample
    ours_context = models.text_encoder(paddle.to_tensor(ids))
    ours_unet = models.unet(paddle.to_tensor(latents), 500, ours_context)
    ours_image = models.vae.decode(paddle.to_tensor(latents))
    assert max_relative_error(ours_context.numpy(), to_numpy(context)) < 1e-4
    assert max_relative_error(ours_unet.numpy(), to_numpy(unet_out)) < 1e-4
    assert max_relative_error(ours_image.numpy(), to_numpy(image)) < 1e-4
    assert models.scheduler_config["beta_schedule"] == "scaled_linear"
    assert models.scheduler_config["clip_sample"] is False  # SD v1.5's: DDIM must not clip its x0


def test_bfloat16_and_float16_safetensors_read(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4).half()}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    loaded = read_state_dict(path)
    np.testing.assert_array_equal(loaded["a"], tensors["a"].float().numpy())
    np.testing.assert_array_equal(loaded["b"], tensors["b"].numpy())


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CKPT",))


def test_malicious_ckpt_is_refused_without_running_payload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system"):
        read_state_dict(path)
    assert not os.path.exists(tmp_path / "PWNED_BY_CKPT")


def test_pickle_without_zip_is_refused(tmp_path):
    path = str(tmp_path / "old.ckpt")
    with open(path, "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        read_state_dict(path)
    assert not os.path.exists("PWNED_BY_CKPT")


@pytest.mark.parametrize("which", [0, 1], ids=["safetensors", "ckpt"])
def test_truncated_file_gets_clear_error(compvis_files, tmp_path, which):
    source = compvis_files[which]
    path = str(tmp_path / os.path.basename(source))
    with open(source, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt|re-download"):
        load_single_file(path, configs=SD1_CONFIGS)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder or file"):
        load_models(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_models(str(tmp_path))


def test_missing_component_named(sd1_folder, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(sd1_folder, folder)
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no weights for vae"):
        load_models(folder)


def test_shape_mismatch_names_key_and_shapes(sd1_folder, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(sd1_folder, folder)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    state = read_state_dict(path)
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    state["conv_in.weight"] = torch.zeros(32, 4, 5, 5)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \[32, 4, 5, 5\].*expects \[32, 4, 3, 3\]"):
        load_models(folder)


def test_unknown_keys_are_named(compvis_files, tmp_path):
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_state_dict(compvis_files[0]).items()}
    state["model.diffusion_model.extra_block.weight"] = torch.ones(1)
    path = str(tmp_path / "extra.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError, match="model.diffusion_model.extra_block.weight"):
        load_single_file(path, configs=SD1_CONFIGS)


def test_hub_id_without_network_says_how_to_use_local_weights():
    with pytest.raises(CheckpointError, match="point at local weights") as error:
        load_models("someone/some-model-that-is-not-cached")
    assert "--model demo" in str(error.value)


def test_torch_zip_checkpoint_read_without_torch_types(tmp_path):
    path = str(tmp_path / "w.bin")
    tensors = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "y": torch.tensor([1, 2]),
               "half": torch.randn(2, 3).half(), "bf16": torch.randn(5).to(torch.bfloat16)}
    torch.save(tensors, path)
    loaded = read_state_dict(path)
    np.testing.assert_array_equal(loaded["x"], tensors["x"].numpy())
    np.testing.assert_array_equal(loaded["y"], [1, 2])
    np.testing.assert_array_equal(loaded["half"], tensors["half"].numpy())
    np.testing.assert_array_equal(loaded["bf16"], tensors["bf16"].float().numpy())
    assert zipfile.is_zipfile(path)


def test_fp16_load_keeps_vae_in_fp32(sd1_folder):
    models = load_models(sd1_folder, dtype="float16")
    assert {str(p.dtype) for p in models.unet.parameters()} == {"paddle.float16"}
    assert {str(p.dtype) for p in models.text_encoder.parameters()} == {"paddle.float16"}
    assert {str(p.dtype) for p in models.vae.parameters()} == {"paddle.float32"}
    reference = read_state_dict(f"{sd1_folder}/unet/diffusion_pytorch_model.safetensors")["conv_in.weight"]
    np.testing.assert_array_equal(models.unet.conv_in.weight.numpy(), reference.astype(np.float16))
