"""What `generate_image` does behind the module facade: check every argument, load the weights once,
run the pipeline per prompt and build the DocumentArray."""
import numbers
import os
import secrets
import threading

import numpy as np
from docarray import DocumentArray

from stable_diffusion.pipeline import ENGINES, FRAME_DECODERS, StableDiffusionPipeline, select_device
from stable_diffusion.results import build_prompt_document
from stable_diffusion.samplers import SAMPLERS
from stable_diffusion.compiled import unet_graph_cached
from stable_diffusion.weights import DEFAULT_MODEL, load_models, resolve_source

MODEL_ENV_VAR = "STABLE_DIFFUSION_MODEL"
MIN_SIDE, MAX_SIDE = 64, 2048


def resolve_model(model=None):
    return model or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def build_prompts(text_prompts, style=None, artist=None):
    """The original module's prompt assembly: trailing punctuation dropped, style and artist appended."""
    prompts = [text_prompts] if isinstance(text_prompts, str) else text_prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("text_prompts must be a non-empty string or a non-empty list of strings")
    for value, name in ((style, "style"), (artist, "artist")):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or None, got {type(value).__name__}")
    built = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"every text prompt must be a non-empty string, got {prompt!r}")
        prompt = prompt.rstrip(",.，。")
        if style:
            prompt += f",{style}"
        if artist:
            prompt += f",{artist},trending on artstation"
        built.append(prompt)
    return built


def check_arguments(width_height, seed, batch_size, num_inference_steps, guidance_scale, negative_prompt,
                    sampler, eta, display_rate, output_dir, frame_decoder):
    if (not isinstance(width_height, (list, tuple)) or len(width_height) != 2
            or not all(_is_int(v) for v in width_height)):
        raise ValueError(f"width_height must be two integers [width, height], got {width_height!r}")
    for side in width_height:
        if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"width and height must be multiples of 8 between {MIN_SIDE} and {MAX_SIDE}, got "
                             f"{list(width_height)}; try {[min(max(v // 8 * 8, MIN_SIDE), MAX_SIDE) for v in width_height]}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 32):
        raise ValueError(f"seed must be an integer from 0 to 2**32-1, or None for a random one; got {seed!r}")
    if not _is_int(batch_size) or not 1 <= batch_size <= 64:
        raise ValueError(f"batch_size must be an integer from 1 to 64, got {batch_size!r}")
    if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= 1000:
        raise ValueError(f"num_inference_steps must be an integer from 1 to 1000, got {num_inference_steps!r}")
    if not _is_number(guidance_scale) or not 0 <= guidance_scale <= 100:
        raise ValueError(f"guidance_scale must be a number from 0 to 100 (7.5 is typical), got {guidance_scale!r}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not _is_number(eta) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number from 0 to 1 (used by the ddim sampler), got {eta!r}")
    if not _is_int(display_rate) or display_rate < 0:
        raise ValueError(f"display_rate must be an integer >= 0 (0: no intermediate frames), got {display_rate!r}")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir):
        raise ValueError(f"output_dir must be a folder path, or None to save nothing; got {output_dir!r}")
    if frame_decoder not in FRAME_DECODERS:
        raise ValueError(f"frame_decoder must be one of {FRAME_DECODERS}, got {frame_decoder!r}")


class TextToImage:
    def __init__(self, model=None, cpu_engine="inference"):
        if cpu_engine not in ENGINES:
            raise ValueError(f"cpu_engine must be one of {ENGINES}, got {cpu_engine!r}")
        self.model_source = resolve_model(model)
        self.cpu_engine = cpu_engine
        self._pipeline = None
        self._pipeline_key = None
        self._lock = threading.Lock()

    def pipeline(self, use_gpu, enable_fp16):
        device = select_device(use_gpu)
        dtype = "float16" if enable_fp16 and device == "gpu" else "float32"
        with self._lock:
            if self._pipeline_key != (device, dtype):
                self._pipeline = None  # free the old copy before loading another
                engine = self.cpu_engine if device == "cpu" else "eager"
                source = resolve_source(self.model_source)
                skip = ("unet",) if engine == "inference" and unet_graph_cached(source) else ()
                models = load_models(source, dtype=dtype, skip_weights=skip)
                self._pipeline = StableDiffusionPipeline(models, dtype, engine)
                self._pipeline_key = (device, dtype)
            return self._pipeline

    def generate_image(self, text_prompts, style=None, artist=None, width_height=(512, 512), seed=None,
                       batch_size=1, output_dir="stable_diffusion_out", num_inference_steps=50,
                       guidance_scale=7.5, negative_prompt=None, sampler="plms", eta=0.0, display_rate=5,
                       latents=None, use_gpu=True, enable_fp16=False, frame_decoder="preview", progress=True):
        prompts = build_prompts(text_prompts, style, artist)
        check_arguments(width_height, seed, batch_size, num_inference_steps, guidance_scale, negative_prompt,
                        sampler, eta, display_rate, output_dir, frame_decoder)
        width, height = width_height
        pipeline = self.pipeline(use_gpu, enable_fp16)
        expected = pipeline.latent_shape(batch_size, height, width)
        if latents is not None:
            try:
                latents = np.asarray(latents, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError("latents must be a numeric array") from None
            if latents.shape != expected:
                raise ValueError(f"latents must have shape {list(expected)} for batch_size={batch_size} at "
                                 f"{width}x{height}, got {list(latents.shape)}")
        seed = secrets.randbelow(2 ** 32) if seed is None else int(seed)
        tags = {"seed": seed, "steps": num_inference_steps, "sampler": sampler,
                "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt or "",
                "width": width, "height": height}
        documents = DocumentArray()
        for prompt in prompts:
            images, frames = pipeline(prompt, negative_prompt or "", height, width, batch_size, num_inference_steps,
                                      float(guidance_scale), sampler, float(eta), seed, latents, display_rate,
                                      frame_decoder, progress)
            documents.append(build_prompt_document(prompt, images, frames, tags, output_dir))
        return documents
