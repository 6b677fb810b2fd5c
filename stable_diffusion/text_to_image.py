"""What `generate_image` does behind the module facade: check every option (options.py), load the
weights once per device and dtype, run the pipeline per prompt and build the DocumentArray."""
import dataclasses
import json
import os
import secrets
import threading

import numpy as np
from docarray import DocumentArray

from stable_diffusion.adapters import embedding_files, resolve_lora
from stable_diffusion.adapters.embeddings import Embeddings, read_embeddings
from stable_diffusion.budget import RequestBudget
from stable_diffusion.images import resized
from stable_diffusion.loading import DEFAULT_MODEL
from stable_diffusion.options import MODEL_DEFAULTS, GenerationOptions, build_prompts
from stable_diffusion.parameters import format_parameters, model_name
from stable_diffusion.prompts import extract_lora_tags
from stable_diffusion.pipeline import ENGINES, StableDiffusionPipeline, select_device
from stable_diffusion.results import build_prompt_document

MODEL_ENV_VAR = "STABLE_DIFFUSION_MODEL"
VAE_ENV_VAR = "STABLE_DIFFUSION_VAE"
# A model folder may say which steps, guidance and sampler suit it (the demo model does).
GENERATION_DEFAULTS_FILE = "generation_defaults.json"


def resolve_model(model=None):
    return model or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def read_generation_defaults(source):
    """The model folder's generation_defaults.json, limited to the knobs in MODEL_DEFAULTS."""
    path = os.path.join(source, GENERATION_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): fix or delete it") from None
    unknown = sorted(set(values) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"{path} sets {unknown}; a model folder may set only {sorted(MODEL_DEFAULTS)}")
    GenerationOptions(**values)  # checked as a request's would be
    return values


class TextToImage:
    def __init__(self, model=None, cpu_engine="inference", variant=None, vae=None, prediction_type=None):
        if cpu_engine not in ENGINES:
            raise ValueError(f"cpu_engine must be one of {ENGINES}, got {cpu_engine!r}")
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or None, got {prediction_type!r}")
        self.model_source = resolve_model(model)
        self.cpu_engine = cpu_engine
        self.variant = variant
        self.vae = vae or os.environ.get(VAE_ENV_VAR) or None
        if self.vae and not os.path.exists(self.vae):
            raise ValueError(f"VAE {self.vae} does not exist: give a .safetensors/.ckpt file or a diffusers VAE folder")
        self.prediction_type = prediction_type
        self._pipeline = None
        self._pipeline_key = None
        self._lock = threading.Lock()

    def load_pipeline(self, use_gpu, enable_fp16, loras=(), token_merging=None):
        """The pipeline for this device, dtype and LoRAs, loaded on first use and kept. On the CPU
        engine other LoRAs are merged into copies of the weights they touch, lent to the graphs'
        predictors (StableDiffusionPipeline.use_loras: no export, bench/lora_switch.py); elsewhere, and
        for a LoRA on a weight the graphs hold only in a derived form, the weights are loaded again
        with the LoRAs merged (on CPU, their graphs exported once per set and cached). Token merging
        (ToMe's ratio, None for none) switches in place on the GPU; the CPU engine loads the pipeline
        again with UNet graphs traced for that ratio (exported once per ratio and cached)."""
        device = select_device(use_gpu)
        dtype = "float16" if enable_fp16 and device == "gpu" else "float32"
        ratio = float(token_merging or 0.0)
        key = (device, dtype, tuple(loras), ratio)
        with self._lock:
            if self._pipeline_key == key:
                return self._pipeline
            if self._pipeline_key is not None and self._pipeline_key[:2] == key[:2] and \
                    self._pipeline.use_token_merging(ratio) and \
                    (self._pipeline_key[2] == key[2] or self._pipeline.use_loras(loras)):
                self._pipeline_key = key
                return self._pipeline
            self._pipeline = None  # free the old copy before loading another
            self._pipeline_key = None
            load = dict(device=device, dtype=dtype, engine=self.cpu_engine, variant=self.variant, vae=self.vae,
                        prediction_type=self.prediction_type)
            pipeline = StableDiffusionPipeline.load(self.model_source, token_merging=ratio, **load)
            if loras and not pipeline.use_loras(loras):
                pipeline = None
                pipeline = StableDiffusionPipeline.load(self.model_source, loras=loras, token_merging=ratio, **load)
            self._pipeline, self._pipeline_key = pipeline, key
            return pipeline

    def generate_image(self, text_prompts, style=None, artist=None, progress=True, budget=None, names_only=False,
                       **options):
        """Keyword options: GenerationOptions' fields. budget: a RequestBudget (default: the limits set
        in the environment, none when none is set). names_only: LoRAs and embeddings only by name, in
        their folders (a served request never names a server path)."""
        prompts = build_prompts(text_prompts, style, artist)
        opts = GenerationOptions(**options)
        # Everything a prompt asks for is found and read before any model is loaded.
        option_loras = tuple((resolve_lora(name, names_only), weight) for name, weight in opts.loras)
        runs = []
        for prompt in prompts:
            text, tagged = extract_lora_tags(prompt)
            runs.append((prompt, text, option_loras + tuple((resolve_lora(name, names_only), weight)
                                                            for name, weight in tagged)))
        # The saved prompt names the LoRAs given as options too, as tags A1111 reads.
        option_tags = "".join(f" <lora:{os.path.splitext(os.path.basename(path))[0]}:{weight:g}>"
                              for path, weight in option_loras)
        named_vectors = read_embeddings(embedding_files(opts.embeddings, names_only))
        pipeline = self.load_pipeline(opts.use_gpu, opts.enable_fp16, runs[0][2], opts.token_merging)
        opts = opts.with_model_defaults(pipeline.native_size, read_generation_defaults(pipeline.models.source)
                                        if os.path.isdir(pipeline.models.source) else {})
        width, height = opts.width_height
        steps_run = opts.num_inference_steps if opts.init_image is None else int(
            opts.num_inference_steps * opts.strength)
        (budget or RequestBudget.from_environment()).check(width, height, len(prompts) * opts.batch_size, steps_run)
        text_layers = pipeline.models.text_encoder.config["num_hidden_layers"]
        if opts.clip_skip > text_layers:
            raise ValueError(f"clip_skip {opts.clip_skip} is more than this model's {text_layers} text encoder layers")
        embeddings = Embeddings(named_vectors, pipeline.models.tokenizer,
                                pipeline.models.text_encoder.config["hidden_size"]) if named_vectors else None
        latents = opts.latents
        if latents is not None:
            expected = pipeline.latent_shape(opts.batch_size, height, width)
            try:
                latents = np.asarray(latents, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError("latents must be a numeric array") from None
            if latents.shape != expected:
                raise ValueError(f"latents must have shape {list(expected)} for batch_size={opts.batch_size} at "
                                 f"{width}x{height}, got {list(latents.shape)}")
        init_image = mask = None
        if opts.init_image is not None:
            init_image = resized(opts.init_image, width, height)
            mask = None if opts.mask_image is None else resized(opts.mask_image, width, height)
        seed = secrets.randbelow(2 ** 32) if opts.seed is None else int(opts.seed)
        tags = {"seed": seed, "steps": opts.num_inference_steps, "sampler": opts.sampler,
                "guidance_scale": float(opts.guidance_scale), "negative_prompt": opts.negative_prompt or "",
                "width": width, "height": height}
        if opts.sampler == "ddim" and opts.eta:
            tags["eta"] = float(opts.eta)
        if init_image is not None:
            tags.update(strength=float(opts.strength), mask=mask is not None)
        if opts.clip_skip != 1:
            tags["clip_skip"] = opts.clip_skip
        if opts.guidance_cutoff is not None:
            tags["guidance_cutoff"] = float(opts.guidance_cutoff)
        if opts.deep_cache_interval is not None:
            tags["deep_cache_interval"] = opts.deep_cache_interval
        if opts.token_merging is not None:
            tags["token_merging"] = float(opts.token_merging)
        model = model_name(self.model_source)
        documents = DocumentArray()
        for prompt, text, loras in runs:
            pipeline = self.load_pipeline(opts.use_gpu, opts.enable_fp16, loras, opts.token_merging)
            images, frames = pipeline(
                text, negative_prompt=opts.negative_prompt or "", height=height, width=width,
                batch_size=opts.batch_size, num_inference_steps=opts.num_inference_steps,
                guidance_scale=float(opts.guidance_scale), sampler=opts.sampler, eta=float(opts.eta), seed=seed,
                latents=latents, display_rate=opts.display_rate, frame_decoder=opts.frame_decoder,
                progress=progress, init_image=init_image, strength=float(opts.strength), mask=mask,
                clip_skip=opts.clip_skip, embeddings=embeddings, guidance_cutoff=opts.guidance_cutoff,
                deep_cache_interval=opts.deep_cache_interval)
            prompt_tags = dict(tags)
            if loras:
                prompt_tags["loras"] = [[os.path.basename(path), weight] for path, weight in loras]
            used = embeddings.used_in([text, opts.negative_prompt or ""], pipeline.models.tokenizer) if embeddings else []
            if used:
                prompt_tags["embeddings"] = used
            parameters = [format_parameters(prompt + option_tags, prompt_tags, model, opts.batch_size, j)
                          for j in range(len(images))]
            documents.append(build_prompt_document(prompt, images, frames, prompt_tags, opts.output_dir, parameters))
        return documents


SERVING_KEYS = ("text_prompts", "style", "artist") + tuple(
    f.name for f in dataclasses.fields(GenerationOptions) if f.name != "output_dir")
