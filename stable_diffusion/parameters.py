"""How a picture was made, kept in the picture: AUTOMATIC1111's `parameters` PNG text chunk.

    a red boat on a lake
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: demo

A1111, ComfyUI's loaders and model sites read this chunk; `hub run --from_png` and
`StableDiffusion.parameters_from_png` read it back into generate_image's options.
"""
import json
import os
import re

from PIL import Image

from stable_diffusion.loading.sources import DEMO_MODEL

PNG_KEY = "parameters"
# Ours -> A1111's names (A1111 1.6+ writes Karras as "Schedule type: Karras"; older ones in the name).
A1111_SAMPLERS = {"plms": "PLMS", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC"}
NEGATIVE_PREFIX = "Negative prompt:"
# `Key: value` pairs of the last line; a value with a comma is JSON-quoted (A1111's own convention).
PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def model_name(source):
    """What the Model field says: 'demo', a Hub repo id as given, or a local file's or folder's name
    (never the server's path)."""
    if source != DEMO_MODEL and os.path.exists(source):
        return os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    return source


def _quoted(value):
    text = str(value)
    return json.dumps(text) if "," in text or "\n" in text or '"' in text else text


def format_parameters(prompt, tags, model, batch_size=1, batch_position=0):
    """The text chunk for one image: tags as TextToImage writes them (seed, steps, sampler, ...)."""
    lines = [prompt]
    if tags.get("negative_prompt"):
        lines.append(f"{NEGATIVE_PREFIX} {tags['negative_prompt']}")
    pairs = {"Steps": tags["steps"], "Sampler": A1111_SAMPLERS[tags["sampler"]],
             "CFG scale": tags["guidance_scale"], "Seed": tags["seed"], "Size": f"{tags['width']}x{tags['height']}",
             "Model": model}
    if tags.get("eta"):
        pairs["Eta DDIM"] = tags["eta"]
    if tags.get("clip_skip", 1) != 1:
        pairs["Clip skip"] = tags["clip_skip"]
    if tags.get("guidance_cutoff") is not None:
        pairs["Guidance cutoff"] = tags["guidance_cutoff"]  # ours; A1111 keeps keys it does not know
    if tags.get("token_merging") is not None:
        pairs["Token merging ratio"] = tags["token_merging"]  # A1111's name for it
    if "strength" in tags:
        pairs["Denoising strength"] = tags["strength"]
    if batch_size > 1:
        pairs.update({"Batch size": batch_size, "Batch pos": batch_position})
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def parse_parameters(text):
    """A1111's parameters text -> (generate_image keyword options, model name or None)."""
    lines = text.strip().split("\n")
    pairs = {}
    if len(lines) > 1 or PAIR.match(lines[-1]):
        found = PAIR.findall(lines[-1])
        if len(found) >= 3:
            pairs = {key.strip(): json.loads(value) if value.startswith('"') else value.strip()
                     for key, value in found}
            lines = lines[:-1]
    prompt, negative = [], []
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX) or negative:
            negative.append(line[len(NEGATIVE_PREFIX):].strip() if not negative else line)
        else:
            prompt.append(line)
    options = {"text_prompts": "\n".join(prompt).strip()}
    if negative:
        options["negative_prompt"] = "\n".join(negative).strip()
    try:
        if "Steps" in pairs:
            options["num_inference_steps"] = int(pairs["Steps"])
        if "CFG scale" in pairs:
            options["guidance_scale"] = float(pairs["CFG scale"])
        if "Seed" in pairs:
            options["seed"] = int(pairs["Seed"])
        if "Size" in pairs:
            options["width_height"] = [int(v) for v in pairs["Size"].lower().split("x")]
        if "Eta DDIM" in pairs:
            options["eta"] = float(pairs["Eta DDIM"])
        if "Denoising strength" in pairs:
            options["strength"] = float(pairs["Denoising strength"])
        if "Batch size" in pairs:
            options["batch_size"] = int(pairs["Batch size"])
        if "Clip skip" in pairs:
            options["clip_skip"] = int(pairs["Clip skip"])
        if "Guidance cutoff" in pairs:
            options["guidance_cutoff"] = float(pairs["Guidance cutoff"])
        if "Token merging ratio" in pairs:
            options["token_merging"] = float(pairs["Token merging ratio"])
    except ValueError as err:
        raise ValueError(f"the parameters text has a value that is not a number ({err}): {pairs}") from None
    if "Sampler" in pairs:
        name = pairs["Sampler"] + (" Karras" if pairs.get("Schedule type") == "Karras" else "")
        ours = {a1111: sampler for sampler, a1111 in A1111_SAMPLERS.items()}
        if name not in ours:
            raise ValueError(f"sampler {name!r} has no counterpart here ({', '.join(ours)}): give another sampler")
        options["sampler"] = ours[name]
    return options, pairs.get("Model")


def read_png_parameters(path):
    """(options, model name or None) from a PNG's `parameters` text chunk."""
    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} could not be read as an image: {err}") from None
    if not text:
        raise ValueError(f"{path} has no '{PNG_KEY}' text chunk: it was not saved by this module, A1111 or a "
                         "tool that keeps generation parameters")
    return parse_parameters(text)


def portable_model(name):
    """The Model field when it names weights found the same way anywhere: the demo model or a Hub repo
    id (a local file's name says nothing of where it lies here)."""
    return name if name and (name == DEMO_MODEL or re.fullmatch(r"[\w.-]+/[\w.-]+", name)) else None
