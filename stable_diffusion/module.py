"""PaddleHub facade: `hub run stable_diffusion`, `hub.Module(name="stable_diffusion")`, `hub serving`."""
import os

import paddle
from paddlehub.module.module import RunModule, moduleinfo, runnable, serving

from stable_diffusion.cli import RunFromClassOrInstance, parse_arguments
from stable_diffusion.options import DEFAULTS
from stable_diffusion.parameters import read_png_parameters
from stable_diffusion.server import adjust_paddlehub_serving, serve_request
from stable_diffusion.text_to_image import MODEL_ENV_VAR, SERVING_KEYS, TextToImage


@moduleinfo(name="stable_diffusion",
            version="1.0.0",
            type="image/text_to_image",
            summary="Stable Diffusion 1.x/2.x in PaddlePaddle: text-to-image, image-to-image, inpainting, LoRAs.",
            author="stable_diffusion for PaddleHub authors",
            author_email="")
class StableDiffusion(RunModule):

    def __init__(self, model=None, cpu_engine="inference", variant=None, vae=None, prediction_type=None):
        """model: 'demo' (the small emoji model shipped with the module), a diffusers model folder, a
        .safetensors/.ckpt file or a Hub repo id; default: the STABLE_DIFFUSION_MODEL environment
        variable, else stable-diffusion-v1-5. Loaded at first use. cpu_engine: 'inference' (Paddle
        Inference with oneDNN, faster) or 'eager', on CPU. variant: for a Hub repo id, e.g. 'fp16'.
        vae: a VAE of its own (file or diffusers folder; default $STABLE_DIFFUSION_VAE, else the model's).
        prediction_type: 'epsilon' or 'v_prediction' for an SD 2.x single file that cannot tell."""
        self.text_to_image = TextToImage(model, cpu_engine, variant, vae, prediction_type)

    def generate_image(self, text_prompts, style=None, artist=None, width_height=DEFAULTS.width_height,
                       seed=DEFAULTS.seed, batch_size=DEFAULTS.batch_size, output_dir=DEFAULTS.output_dir,
                       num_inference_steps=DEFAULTS.num_inference_steps, guidance_scale=DEFAULTS.guidance_scale,
                       negative_prompt=DEFAULTS.negative_prompt, sampler=DEFAULTS.sampler, eta=DEFAULTS.eta,
                       display_rate=DEFAULTS.display_rate, latents=DEFAULTS.latents, use_gpu=DEFAULTS.use_gpu,
                       enable_fp16=DEFAULTS.enable_fp16, frame_decoder=DEFAULTS.frame_decoder,
                       init_image=DEFAULTS.init_image, strength=DEFAULTS.strength, mask_image=DEFAULTS.mask_image,
                       loras=DEFAULTS.loras, embeddings=DEFAULTS.embeddings, clip_skip=DEFAULTS.clip_skip,
                       guidance_cutoff=DEFAULTS.guidance_cutoff, deep_cache_interval=DEFAULTS.deep_cache_interval,
                       token_merging=DEFAULTS.token_merging, fast=DEFAULTS.fast):
        """Text to images, returned as a docarray DocumentArray; see the module README for each argument.
        None for width_height, num_inference_steps, guidance_scale or sampler: the model's own.
        init_image (a path, PIL image or uint8 array): image-to-image, `strength` of it repainted;
        with mask_image (white repainted, black kept): inpainting. loras: [(file or name, weight), ...];
        embeddings: textual-inversion files; prompts in A1111's syntax ((word:1.2), BREAK, <lora:name:0.8>)."""
        paddle.disable_static()
        return self.text_to_image.generate_image(
            text_prompts, style=style, artist=artist, width_height=width_height, seed=seed,
            batch_size=batch_size, output_dir=output_dir, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, sampler=sampler, eta=eta,
            display_rate=display_rate, latents=latents, use_gpu=use_gpu, enable_fp16=enable_fp16,
            frame_decoder=frame_decoder, init_image=init_image, strength=strength, mask_image=mask_image,
            loras=loras, embeddings=embeddings, clip_skip=clip_skip, guidance_cutoff=guidance_cutoff,
            deep_cache_interval=deep_cache_interval, token_merging=token_merging, fast=fast)

    _run_func = RunFromClassOrInstance()

    @runnable
    def run_cmd(self, argvs):
        prompts, options, loading = parse_arguments(argvs, MODEL_ENV_VAR)
        current = self.text_to_image
        if (loading["model"] or loading["variant"] or loading["vae"] or loading["prediction_type"]
                or loading["cpu_engine"] != current.cpu_engine):
            self.text_to_image = TextToImage(loading["model"] or current.model_source, loading["cpu_engine"],
                                             loading["variant"], loading["vae"] or current.vae,
                                             loading["prediction_type"] or current.prediction_type)
        documents = self.generate_image(prompts, **options)
        files = [path for document in documents for path in document.tags["files"]]
        print(f"saved {len(files)} images in {os.path.abspath(options['output_dir'])}:")
        for path in files:
            print(f"  {path}")
        return files

    @serving
    def serving_method(self, text_prompts=None, **kwargs):
        """JSON body -> generate_image keyword arguments, within the served budget (budget.py); the
        result as a base64 DocumentArray."""
        paddle.disable_static()
        return serve_request(self.text_to_image.generate_image, SERVING_KEYS, text_prompts,
                             **kwargs).to_base64()

    @staticmethod
    def parameters_from_png(path):
        """generate_image's options saved in a PNG's `parameters` chunk (this module's or A1111's):
        `module.generate_image(**module.parameters_from_png("x.png"))` makes it again (with the model it names loaded)."""
        return read_png_parameters(path)[0]


adjust_paddlehub_serving()  # only when `hub serving` loads the module (server.py)
