"""Text to image: prompt -> text embeddings -> guided denoising -> VAE decode -> uint8 images.

Randomness comes only from a per-call numpy Generator seeded by the caller, never from process-global
state, so a seed gives the same image whether a request runs alone or beside others in a server.
"""
import os

import numpy as np
import paddle
from tqdm import tqdm

from stable_diffusion.adapters import adapter_keys
from stable_diffusion.adapters.lora import planned_updates
from stable_diffusion.images import binarized_mask, to_model_range
from stable_diffusion.loading import load_models, resolve_source
from stable_diffusion.models.unet import ShallowBranch
from stable_diffusion.prompts import chunk_prompt
from stable_diffusion.samplers import make_sampler

# Linear map from SD v1 latents to RGB: a preview at the cost of one small matmul instead of a VAE
# decode (which costs about 1.6 guided UNet steps on CPU, bench/NOTES.md section 6). Approximate; the final image
# always goes through the VAE.
LATENT_RGB_FACTORS = np.array([[0.3512, 0.2297, 0.3227],
                               [0.3250, 0.4974, 0.2350],
                               [-0.2829, 0.1762, 0.2721],
                               [-0.2120, -0.2616, -0.7177]], dtype=np.float32)
ENGINES = ("inference", "eager")


def select_device(use_gpu=True):
    """The GPU when Paddle has CUDA and one is visible, else the CPU with all its cores."""
    if use_gpu and paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_device("gpu")
        return "gpu"
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(cpu_threads())
    return "cpu"


def cpu_threads():
    """OMP_NUM_THREADS when set above 1, else every core this process may use. (Importing Paddle sets
    OMP_NUM_THREADS to 1 when it is unset, so 1 cannot be told from unset.)"""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 1:
        return int(requested)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def graph_parameter_parts(component, name, delta, unet):
    """{graph: [(the traced graph layer's name for a part of parameter `name`, that part's update)]}: the
    UNet graph holds the UNet under `unet.` and GEGLU's projection as two halves (cpu/compiled.py,
    hold_derived_weights); the shallow branch's graph (models/unet.py ShallowBranch) holds the last up
    block's last resnet and attention as `resnet.` and `attention.`; the text encoder's graph holds its
    layers without `encoder.`."""
    if component == "text_encoder":
        return {"text_encoder": [(name.replace("encoder.layers.", "layers.", 1).replace(
            "embeddings.position_embedding.", "position_embedding.", 1), delta)]}

    def parts(graph_name):
        if graph_name.endswith("ff.net.0.proj.weight"):
            inner = delta.shape[1] // 2
            return [(f"{graph_name[:-len('net.0.proj.weight')]}halves.{i}.weight", half)
                    for i, half in enumerate((delta[:, :inner], delta[:, inner:]))]
        return [(graph_name, delta)]

    found = {"unet": parts(f"unet.{name}")}
    last = len(unet.up_blocks) - 1
    layer = len(unet.up_blocks[last].resnets) - 1
    shallow_names = {f"up_blocks.{last}.resnets.{layer}.": "resnet.", f"up_blocks.{last}.attentions.{layer}.": "attention.",
                     "conv_in.": "conv_in.", "time_embedding.": "time_embedding.", "conv_norm_out.": "conv_norm_out.",
                     "conv_out.": "conv_out."}
    prefix = next((p for p in shallow_names if name.startswith(p)), None)
    if prefix is not None:
        found["unet_shallow"] = parts(shallow_names[prefix] + name[len(prefix):])
    return found


def to_uint8(images):
    """[-1, 1] float NCHW -> uint8 NHWC, rounding as diffusers' image processor does."""
    images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


class Inpainting:
    """What the denoising loop needs to inpaint. A 9-channel (inpainting) UNet is given the mask and
    the masked picture's latents beside its input (`unet_extra`); a 4-channel one gets the known region
    blended back at every step, noised to the next step's level (`image_latents`, `noise`), as diffusers'
    Inpaint pipeline does for each kind."""

    def __init__(self, mask, unet_extra=None, image_latents=None, noise=None):
        self.mask, self.unet_extra, self.image_latents, self.noise = mask, unet_extra, image_latents, noise


class StableDiffusionPipeline:
    """Text to image in four phases, each callable alone: `encode_prompt` -> `prepare_latents` ->
    `denoise` -> `decode`; `__call__` runs them in turn and takes precomputed prompt embeddings.
    Image-to-image and inpainting start from `encode_image`'s latents instead of noise alone.

    engine: 'eager' runs the Paddle layers as they are; 'inference' (CPU only) runs the text encoder,
    UNet and VAE decoder as Paddle Inference graphs with oneDNN, several times faster (cpu/)."""

    def __init__(self, models, dtype="float32", engine="eager"):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.models = models
        self.dtype = dtype
        self.engine = engine
        self.loras = ()  # lent to the CPU graphs by use_loras
        # text_encoder: token embeddings -> every layer's normed output (CLIPTextModel.layer_outputs)
        self.text_encoder, self.unet = models.text_encoder.layer_outputs, models.unet
        self.vae_encode, self.vae_decode = models.vae.encode, models.vae.decode
        if engine == "inference":
            from stable_diffusion.cpu.compiled import compile_for_cpu
            self.text_encoder, self.unet, self.vae_encode, self.vae_decode = compile_for_cpu(models, cpu_threads())
            self.unet_keeping_deep_features, self.unet_shallow = self.unet.keeping_deep_features, self.unet.shallow
        else:
            unet = models.unet
            self.unet_keeping_deep_features = lambda sample, t, context: unet.forward_keeping_deep_features(
                sample, paddle.to_tensor(unet.time_features(t)), context, *unet.merge_tensors(sample, t))
            shallow = ShallowBranch(unet)
            self.unet_shallow = lambda sample, t, context, deep: shallow(
                sample, paddle.to_tensor(unet.time_features(t)), context, deep, *unet.merge_tensors(sample, t))

    @classmethod
    def load(cls, source=None, *, device="cpu", dtype="float32", engine="inference", variant=None, loras=(),
             vae=None, prediction_type=None, token_merging=0.0):
        """The pipeline for weights at `source` (see loading/) on `device` ('cpu' or 'gpu'); `engine`
        applies on the CPU, the GPU runs eagerly. `loras` [(file, weight), ...] are merged into the
        weights, `vae` replaces the model's VAE (loading.load_models). `token_merging`: ToMe's ratio
        (models/token_merging.py), which the CPU engine's UNet graphs are traced with. With the UNet's
        CPU graphs for these weights already saved, its eager weights are never read."""
        engine = engine if device == "cpu" else "eager"
        path = resolve_source(source, variant)
        unet_key = adapter_keys(loras, vae).get("unet", ())
        skip = ("unet",) if engine == "inference" and cls.cpu_graphs_saved(path, unet_key, token_merging) else ()
        models = load_models(path, dtype=dtype, variant=variant, skip_weights=skip, loras=loras, vae=vae,
                             prediction_type=prediction_type)
        models.unet.token_merging = float(token_merging)
        return cls(models, dtype, engine)

    def use_token_merging(self, ratio):
        """Run with ToMe's `ratio` (0: off) from the next call on; False, changing nothing, on the CPU
        engine, whose UNet graphs are traced for one ratio: load the pipeline with it instead."""
        if float(ratio) == self.models.unet.token_merging:
            return True
        if self.engine == "inference":
            return False
        self.models.unet.token_merging = float(ratio)
        return True

    def use_loras(self, loras):
        """On the CPU engine: run with `loras` [(file, weight), ...] merged into the UNet's and text
        encoder's weights, lent to new predictors of the graphs already exported (no export, no
        reading of the checkpoint); () goes back to the plain weights. False, changing nothing, where a
        LoRA touches a weight that a graph holds only in a derived form (an upsampler's convolution):
        load the pipeline with the LoRA merged (load(loras=...)) instead."""
        if self.engine != "inference" or self.models.adapters.get("unet"):  # not on weights merged already
            return False
        graphs = {"unet": self.unet.graph, "unet_shallow": self.unet.shallow_graph, "text_encoder": self.text_encoder}
        overrides = {graph: {} for graph in graphs}
        for component, name, delta in planned_updates(self.models, loras):
            for graph, parts in graph_parameter_parts(component, name, delta, self.models.unet).items():
                graph_names = graphs[graph].lendable_names([part for part, _ in parts])
                if graph_names is None:
                    return False
                for graph_name, (_, part_delta) in zip(graph_names, parts):
                    base = overrides[graph].get(graph_name, graphs[graph].base_weight(graph_name))
                    overrides[graph][graph_name] = base + part_delta
        for name, graph in graphs.items():
            if overrides[name] or graph.overrides:
                graph.lend_weights(overrides[name])
        self.loras = tuple(loras)
        return True

    @staticmethod
    def cpu_graphs_saved(path, adapters=(), token_merging=0.0):
        """Whether the CPU engine's UNet graphs for the weights at `path` (with `adapters`, and traced
        for `token_merging`) are saved already."""
        from stable_diffusion.cpu.compiled import unet_graph_cached
        return unet_graph_cached(path, adapters, token_merging)

    @property
    def latent_channels(self):
        return self.models.vae.config["latent_channels"]

    @property
    def is_inpainting_model(self):
        """A UNet whose input is the latents, the mask and the masked picture's latents (4 + 1 + 4)."""
        return self.models.unet.config["in_channels"] == 2 * self.latent_channels + 1

    @property
    def vae_factor(self):
        return self.models.vae.downsampling_factor

    @property
    def native_size(self):
        """(width, height) the UNet was trained at, as diffusers' default: sample_size x VAE factor."""
        side = self.models.unet.config.get("sample_size", 64) * self.vae_factor
        return side, side

    def latent_shape(self, batch_size, height, width):
        return (batch_size, self.latent_channels, height // self.vae_factor, width // self.vae_factor)

    @paddle.no_grad()
    def encode_text(self, texts, clip_skip=1, embeddings=None):
        """Texts in A1111's prompt syntax (prompts.py) -> embeddings [len(texts), 77 x chunks, D], each
        text padded with empty chunks to the longest's count. `embeddings`: textual inversion
        (adapters/embeddings.py). clip_skip: 1 the last layer's output, 2 the one before, ..."""
        layers = self.models.text_encoder.config["num_hidden_layers"]
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be from 1 (the last layer) to {layers}, got {clip_skip}")
        tokenizer = self.models.tokenizer
        chunked = [chunk_prompt(text, tokenizer, embeddings) for text in texts]
        count = max(len(chunks) for chunks in chunked)
        empty = chunk_prompt("", tokenizer)[0]
        chunks = [chunk for text_chunks in chunked for chunk in text_chunks + [empty] * (count - len(text_chunks))]
        token_embeds = self.models.text_encoder.embed_tokens(
            paddle.to_tensor(np.array([chunk.tokens for chunk in chunks], np.int64))).numpy()
        for row, chunk in enumerate(chunks):
            for position, vectors in chunk.vectors:
                token_embeds[row, position:position + len(vectors)] = vectors
        hidden = self.text_encoder(paddle.to_tensor(token_embeds))[-clip_skip].astype("float32").numpy()
        for row, chunk in enumerate(chunks):
            weights = np.array(chunk.weights, np.float32)
            if (weights != 1).any():  # A1111's emphasis: scale each token's output, keep the chunk's mean
                original_mean = hidden[row].mean()
                hidden[row] *= weights[:, None]
                hidden[row] *= original_mean / hidden[row].mean()
        hidden = hidden.reshape(len(texts), count * hidden.shape[1], hidden.shape[2])
        return paddle.to_tensor(hidden).astype(self.dtype)

    def encode_prompt(self, prompt, negative_prompt="", guided=True, clip_skip=1, embeddings=None):
        """-> (prompt embeddings [1, 77 x chunks, D], negative prompt embeddings of as many chunks, or
        None when not guided)."""
        if not guided:
            return self.encode_text([prompt], clip_skip, embeddings), None
        negative, positive = self.encode_text([negative_prompt or "", prompt], clip_skip, embeddings).chunk(2)
        return positive, negative

    def pad_to_same_chunks(self, *embeds):
        """Embeddings of different chunk counts (precomputed ones) padded with empty chunks, as A1111 pads."""
        empty = self.encode_text([""])
        longest = max(e.shape[1] for e in embeds)
        if any((longest - e.shape[1]) % empty.shape[1] for e in embeds):
            raise ValueError(f"prompt embeddings of lengths {[e.shape[1] for e in embeds]}: each must be a "
                             f"multiple of {empty.shape[1]} tokens")
        return [paddle.concat([e] + [empty] * ((longest - e.shape[1]) // empty.shape[1]), axis=1) for e in embeds]

    def prepare_latents(self, shape, sampler, rng, latents=None):
        """Unit noise from `rng` (or the caller's `latents`), scaled to the sampler's first step."""
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        return paddle.to_tensor(np.asarray(latents, np.float32) * float(sampler.init_noise_sigma))

    @paddle.no_grad()
    def encode_image(self, pixels, rng):
        """Pixels in [-1, 1], float32 [1, 3, H, W] -> scaled latents [1, C, H/f, W/f], sampled from the
        VAE's latent distribution with `rng` (diffusers' `latent_dist.sample(generator)`)."""
        mean, logvar = self.vae_encode(paddle.to_tensor(pixels))
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        sample = mean.numpy() + np.exp(0.5 * logvar.numpy()) * eps
        return paddle.to_tensor(sample.astype(np.float32) * float(self.models.vae.scaling_factor))

    def prepare_image_latents(self, shape, sampler, steps, rng, image, strength, mask=None):
        """Image-to-image (and inpainting): skip the first of the `steps` that `strength` leaves out
        (PLMS's extra model call not counted, as in diffusers), then noise the picture's latents to the
        first remaining step. Returns (latents, Inpainting or None)."""
        skipped = steps - min(int(steps * strength), steps)
        if skipped >= steps:
            raise ValueError(f"strength {strength} x {steps} steps leaves no step to run: raise strength or "
                             "num_inference_steps")
        sampler.skip_steps(skipped)
        if mask is None:
            image_latents = paddle.concat([self.encode_image(to_model_range(image), rng)] * shape[0])
            noise = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))
            return sampler.add_noise(image_latents, noise, 0), None
        mask = binarized_mask(mask)
        from_pure_noise = strength == 1.0
        image_latents = None
        if not self.is_inpainting_model or not from_pure_noise:
            image_latents = paddle.concat([self.encode_image(to_model_range(image), rng)] * shape[0])
        noise = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))
        if from_pure_noise:
            latents = noise * float(sampler.init_noise_sigma)
        else:
            latents = sampler.add_noise(image_latents, noise, 0)
        factor = self.vae_factor
        latent_mask = paddle.to_tensor(np.repeat(mask[:, :, ::factor, ::factor], shape[0], axis=0))
        if not self.is_inpainting_model:
            return latents, Inpainting(latent_mask, image_latents=image_latents, noise=noise)
        masked_latents = paddle.concat([self.encode_image(to_model_range(image) * (mask < 0.5), rng)] * shape[0])
        return latents, Inpainting(latent_mask, unet_extra=paddle.concat([latent_mask, masked_latents], axis=1))

    @paddle.no_grad()
    def denoise(self, latents, prompt_embeds, negative_prompt_embeds, sampler, guidance_scale, rng,
                display_rate=0, frame_decoder="preview", progress=True, inpainting=None, guidance_cutoff=None,
                deep_cache_interval=None):
        """The sampling loop; guided when negative_prompt_embeds is given, until the step index
        int(steps x guidance_cutoff) included, then by the prompt alone (one UNet pass a step instead of
        two), as diffusers' SDCFGCutoffCallback. With `deep_cache_interval` N, DeepCache: a full UNet pass
        every N steps, the shallow branch alone between them on the deep features kept from it (the
        conditional half of them once guidance is cut off). Returns (latents, frames: list of (step, uint8 images)),
        a frame every `display_rate` steps before the last."""
        batch_size = latents.shape[0]
        steps = sampler.timesteps
        last_guided = len(steps) if guidance_cutoff is None else int(len(steps) * guidance_cutoff)
        conditional = prompt_embeds.astype(self.dtype).repeat_interleave(batch_size, axis=0)
        context = conditional
        if negative_prompt_embeds is not None:
            context = paddle.concat([negative_prompt_embeds, prompt_embeds])
            context = context.astype(self.dtype).repeat_interleave(batch_size, axis=0)
        frames, deep = [], None
        for i, t in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
            guided = negative_prompt_embeds is not None and i <= last_guided
            model_input = sampler.scale_model_input(latents, i)
            if inpainting is not None and inpainting.unet_extra is not None:
                model_input = paddle.concat([model_input, inpainting.unet_extra], axis=1)
            if guided:
                model_input = paddle.concat([model_input, model_input])
            step_context = context if guided else conditional
            if deep_cache_interval and i % deep_cache_interval:
                if deep.shape[0] != model_input.shape[0]:  # guidance cut off since the full step
                    deep = deep[deep.shape[0] - model_input.shape[0]:]
                noise_pred = self.unet_shallow(model_input.astype(self.dtype), float(t), step_context, deep)
            elif deep_cache_interval:
                noise_pred, deep = self.unet_keeping_deep_features(model_input.astype(self.dtype), float(t),
                                                                   step_context)
            else:
                noise_pred = self.unet(model_input.astype(self.dtype), float(t), step_context)
            noise_pred = noise_pred.astype("float32")
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            noise = None
            if sampler.needs_noise:
                noise = paddle.to_tensor(rng.standard_normal(latents.shape, dtype=np.float32))
            latents = sampler.step(noise_pred, i, latents, noise)
            if inpainting is not None and inpainting.image_latents is not None:
                known = inpainting.image_latents
                if i + 1 < len(steps):
                    known = sampler.add_noise(known, inpainting.noise, i + 1)
                latents = (1 - inpainting.mask) * known + inpainting.mask * latents
            if display_rate and (i + 1) % display_rate == 0 and i + 1 < len(steps):
                frames.append((i + 1, self.decode(latents) if frame_decoder == "vae" else self.preview(latents)))
        return latents, frames

    @paddle.no_grad()
    def decode(self, latents):
        """Latents -> uint8 images [B, H, W, 3]. The VAE stays in fp32: SD's decoder overflows in fp16."""
        images = self.vae_decode(latents.astype("float32") / self.models.vae.scaling_factor)
        return to_uint8(images.numpy())

    def preview(self, latents):
        if latents.shape[1] != LATENT_RGB_FACTORS.shape[0]:
            return self.decode(latents)
        rgb = np.einsum("bchw,cr->brhw", latents.astype("float32").numpy(), LATENT_RGB_FACTORS)
        rgb = rgb.repeat(self.vae_factor, axis=2).repeat(self.vae_factor, axis=3)
        return to_uint8(rgb)

    def __call__(self, prompt=None, *, negative_prompt="", height=512, width=512, batch_size=1,
                 num_inference_steps=50, guidance_scale=7.5, sampler="plms", eta=0.0, seed=0,
                 latents=None, display_rate=0, frame_decoder="preview", progress=True,
                 prompt_embeds=None, negative_prompt_embeds=None, init_image=None, strength=0.8, mask=None,
                 clip_skip=1, embeddings=None, guidance_cutoff=None, deep_cache_interval=None):
        """Returns (final uint8 images [B, H, W, 3], frames: list of (step, uint8 images)), the final
        images last. `prompt_embeds` / `negative_prompt_embeds` ([1, L, D]) stand in for the texts.
        `init_image` (uint8 [height, width, 3]): image-to-image from it, `strength` of the steps run;
        with `mask` (uint8 [height, width], white repainted), inpainting. Prompts are read in A1111's
        syntax (prompts.py); `embeddings` are textual-inversion vectors by name, `clip_skip` the
        text encoder's layer from the end whose output guides. `guidance_cutoff` in (0, 1): guidance
        stops after that fraction of the steps; `deep_cache_interval` N: DeepCache (denoise).
        Randomness comes from `seed` alone: the picture's latent sample, the initial noise, each step's."""
        if self.is_inpainting_model and (init_image is None or mask is None):
            raise ValueError("this is an inpainting checkpoint (its UNet takes a mask): give init_image and "
                             "mask_image, or use an ordinary checkpoint for text-to-image")
        rng = np.random.default_rng(seed)
        scheduler = make_sampler(sampler, self.models.scheduler_config, num_inference_steps, eta)
        shape = self.latent_shape(batch_size, height, width)
        inpainting = None
        if init_image is not None:
            latents, inpainting = self.prepare_image_latents(shape, scheduler, num_inference_steps, rng, init_image,
                                                              strength, mask)
        else:
            latents = self.prepare_latents(shape, scheduler, rng, latents)
        guided = guidance_scale > 1.0
        if prompt_embeds is None:
            prompt_embeds, encoded_negative = self.encode_prompt(prompt, negative_prompt, guided, clip_skip, embeddings)
            negative_prompt_embeds = negative_prompt_embeds if negative_prompt_embeds is not None else encoded_negative
        elif guided and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_text([negative_prompt or ""], clip_skip, embeddings)
        if not guided:
            negative_prompt_embeds = None
        elif negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
            prompt_embeds, negative_prompt_embeds = self.pad_to_same_chunks(prompt_embeds, negative_prompt_embeds)
        latents, frames = self.denoise(latents, prompt_embeds, negative_prompt_embeds, scheduler, guidance_scale,
                                       rng, display_rate, frame_decoder, progress, inpainting, guidance_cutoff,
                                       deep_cache_interval)
        images = self.decode(latents)
        frames.append((len(scheduler.timesteps), images))
        return images, frames
