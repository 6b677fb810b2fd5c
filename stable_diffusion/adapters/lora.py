"""LoRA: low-rank updates merged into the UNet's and text encoder's weights before they run.

    W' = W + weight x (alpha / rank) x up @ down

Layouts read (a file may hold the UNet's layers, the text encoder's, or both):
- kohya / A1111 (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`),
  LoCon's convolution layers included ([rank, in, kh, kw] down, [out, rank, 1, 1] up). A kohya name
  is a module path with its dots made underscores; it is looked up in a table made from the model's
  own parameter names, never parsed.
- PEFT as diffusers saves it (`unet.down_blocks.0....to_q.lora_A.weight`, `lora_B`; alpha from the
  file's `lora_adapter_metadata`, else alpha = rank) and diffusers' older layouts
  (`...to_q.lora.down.weight`, `...processor.to_q_lora.down.weight`, `...lora_linear_layer.down.weight`).
Anything else (LoHa, LoKr, DoRA, an SDXL LoRA, names that match no layer of this model) is refused
with the first names it could not place: never merged halfway, never a silent no-op.
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from stable_diffusion.loading.checkpoint_files import (CheckpointError, read_safetensors, read_safetensors_metadata,
                                                       read_torch_pickle)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
# The pair names of each layout, as (down, up).
KOHYA_PAIR = (".lora_down.weight", ".lora_up.weight")
DIFFUSERS_PAIRS = [(".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
                   (".lora.down.weight", ".lora.up.weight"),
                   (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")]
OLD_PROCESSOR_NAME = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
UNSUPPORTED_KINDS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "dora_scale": "DoRA", ".lora_mid.": "LoCon with a "
                     "mid (CP) factor", "lora_te1_": "SDXL", "lora_te2_": "SDXL", "lora_unet_input_blocks_": "SDXL"}


@dataclass
class LoraLayer:
    down: np.ndarray
    up: np.ndarray
    alpha: Optional[float]

    def delta(self, shape):
        """The update of a weight of PyTorch layout `shape`, at weight 1."""
        rank = self.down.shape[0]
        update = self.up.reshape(self.up.shape[0], rank).astype(np.float32) @ self.down.reshape(rank, -1).astype(
            np.float32)
        scale = 1.0 if self.alpha is None else self.alpha / rank
        return (update * scale).reshape(shape)


def read_lora(path):
    """-> {(component, module name as the file writes it): LoraLayer}, and the file's layout name."""
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file {path} does not exist")
    if not path.endswith(LORA_SUFFIXES):
        raise CheckpointError(f"{path}: a LoRA is a {', '.join(LORA_SUFFIXES)} file")
    state = read_safetensors(path) if path.endswith(".safetensors") else read_torch_pickle(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a LoRA's tensors")
    state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    for marker, kind in UNSUPPORTED_KINDS.items():
        if any(marker in key for key in state):
            raise CheckpointError(f"{path} is a {kind} network, which is not supported: use a LoRA (LoCon) made "
                                  "for SD 1.x/2.x")
    if any(key.startswith(tuple(KOHYA_PREFIXES)) for key in state):
        return read_kohya(state, path), "kohya"
    return read_diffusers(state, path), "diffusers"


def read_kohya(state, path):
    layers, placed = {}, set()
    for key in state:
        if not key.endswith(KOHYA_PAIR[0]):
            continue
        module = key[: -len(KOHYA_PAIR[0])]
        up_key, alpha_key = module + KOHYA_PAIR[1], module + ".alpha"
        if up_key not in state:
            raise CheckpointError(f"{path}: {key} has no {up_key}")
        prefix = next((p for p in KOHYA_PREFIXES if module.startswith(p)), None)
        if prefix is None:
            continue  # reported below with the other keys left over
        alpha = float(np.asarray(state[alpha_key]).reshape(-1)[0]) if alpha_key in state else None
        layers[(KOHYA_PREFIXES[prefix], module[len(prefix):])] = LoraLayer(state[key], state[up_key], alpha)
        placed.update((key, up_key, alpha_key))
    check_all_placed(state, placed, path)
    return layers


def read_diffusers(state, path):
    metadata = read_safetensors_metadata(path) if path.endswith(".safetensors") else {}
    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        adapter = {}
    layers, placed = {}, set()
    for key in state:
        pair = next(((down, up) for down, up in DIFFUSERS_PAIRS if key.endswith(down)), None)
        prefix = next((p for p in DIFFUSERS_PREFIXES if key.startswith(p)), None)
        if pair is None or prefix is None:
            continue
        module = key[len(prefix): -len(pair[0])]
        up_key = key[: -len(pair[0])] + pair[1]
        if up_key not in state:
            raise CheckpointError(f"{path}: {key} has no {up_key}")
        component = DIFFUSERS_PREFIXES[prefix]
        module = OLD_PROCESSOR_NAME.sub(lambda m: "." + m.group(1).replace("to_out", "to_out.0"), module)
        alpha = adapter.get(f"{component}.lora_alpha")  # PEFT's config, as diffusers saves it
        patterns = adapter.get(f"{component}.alpha_pattern") or {}
        alpha = next((a for pattern, a in patterns.items() if re.search(pattern, module)), alpha)
        layer = LoraLayer(state[key], state[up_key], None if alpha is None else float(alpha))
        layers[(component, module)] = layer
        placed.update((key, up_key))
    check_all_placed(state, placed, path)
    if not layers:
        raise CheckpointError(f"{path} holds no LoRA layers (no lora_down/lora_up or lora_A/lora_B pairs under "
                              "lora_unet_/lora_te_ or unet./text_encoder.): is it a LoRA?")
    return layers


def check_all_placed(state, placed, path):
    left = sorted(set(state) - placed)
    if left:
        raise CheckpointError(f"{path}: {len(left)} keys are not LoRA layers of a UNet or text encoder "
                              f"(first: {left[:3]})")


def module_table(model, kohya):
    """{module name as a LoRA file writes it: parameter name of its weight} for one component."""
    table = {}
    for name, _ in model.named_parameters():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        written = "text_model." + module if model.__class__.__name__ == "CLIPTextModel" else module
        table[written.replace(".", "_") if kohya else written] = name
    return table


def planned_updates(models, loras):
    """[(component, parameter name, update in Paddle's layout for that parameter)] for [(path, weight),
    ...], every layer of every file checked against the model (names and shapes) before any update is
    made; layers of several files on one weight are summed. Needs only the models' structure."""
    from stable_diffusion.loading.state_dict import linear_weight_names
    params = {c: dict(getattr(models, c).named_parameters()) for c in ("unet", "text_encoder")}
    linear = {c: linear_weight_names(getattr(models, c)) for c in ("unet", "text_encoder")}
    planned = []
    for path, weight in loras:
        layers, layout = read_lora(path)
        tables = {c: module_table(getattr(models, c), layout == "kohya") for c in ("unet", "text_encoder")}
        unmatched = sorted(f"{c}: {m}" for c, m in layers if m not in tables[c])
        if unmatched:
            raise CheckpointError(
                f"{path}: {len(unmatched)} of its {len(layers)} layers match nothing in this model (first: "
                f"{unmatched[:3]}); is it a LoRA for another model family (SD 2.x, SDXL)?")
        for (component, module), layer in layers.items():
            name = tables[component][module]
            transposed = name in linear[component]
            shape = tuple(params[component][name].shape)
            torch_shape = shape[::-1] if transposed else shape
            if int(np.prod(torch_shape)) != layer.up.shape[0] * int(np.prod(layer.down.shape[1:])):
                raise CheckpointError(f"{path}: layer {module} updates a weight of shape "
                                      f"{[layer.up.shape[0], *layer.down.shape[1:]]}, but this model's is "
                                      f"{list(torch_shape)}: the LoRA is for another model")
            planned.append((component, name, transposed, torch_shape, layer, float(weight)))
    updates = {}
    for component, name, transposed, torch_shape, layer, weight in planned:
        delta = layer.delta(torch_shape) * weight
        delta = np.ascontiguousarray(delta.T if transposed else delta)
        key = (component, name)
        updates[key] = updates[key] + delta if key in updates else delta
    return [(component, name, delta) for (component, name), delta in updates.items()]


def merge_loras(models, loras):
    """Merge [(path, weight), ...] into the models' loaded weights (StableDiffusionModels), in place.
    Weights not loaded (a component whose CPU graph is cached, built lazily) are checked but not
    changed: their graph holds the merged weights already."""
    updates = planned_updates(models, loras)
    params = {c: dict(getattr(models, c).named_parameters()) for c in ("unet", "text_encoder")}
    for component, name, delta in updates:
        param = params[component][name]
        if param._is_initialized():
            value = param.numpy()
            param.set_value((value.astype(np.float32) + delta).astype(value.dtype))
    return len(updates)
