"""PaddleHub facade: `hub run stable_diffusion`, `hub.Module(name="stable_diffusion")`, `hub serving`."""
import argparse
import inspect
import os

import paddle
from paddlehub.module.module import RunModule, moduleinfo, runnable, serving

from stable_diffusion.text_to_image import MODEL_ENV_VAR, TextToImage


@moduleinfo(name="stable_diffusion",
            version="1.0.0",
            type="image/text_to_image",
            summary="Stable Diffusion v1 text-to-image in PaddlePaddle: PLMS, DDIM, Euler and DPM++ samplers.",
            author="stable_diffusion for PaddleHub authors",
            author_email="")
class StableDiffusion(RunModule):

    def __init__(self, model=None, cpu_engine="inference"):
        """model: a diffusers model folder, a .safetensors/.ckpt file or a Hub repo id; default: the
        STABLE_DIFFUSION_MODEL environment variable, else stable-diffusion-v1-5. Loaded at first use.
        cpu_engine: 'inference' (Paddle Inference with oneDNN, faster) or 'eager', on CPU."""
        self.text_to_image = TextToImage(model, cpu_engine)

    def generate_image(self, text_prompts, style=None, artist=None, width_height=[512, 512], seed=None,
                       batch_size=1, output_dir="stable_diffusion_out", num_inference_steps=50,
                       guidance_scale=7.5, negative_prompt=None, sampler="plms", eta=0.0, display_rate=5,
                       latents=None, use_gpu=True, enable_fp16=False, frame_decoder="preview"):
        """Text to images, returned as a docarray DocumentArray; see the module README for each argument."""
        paddle.disable_static()
        return self.text_to_image.generate_image(
            text_prompts, style=style, artist=artist, width_height=width_height, seed=seed,
            batch_size=batch_size, output_dir=output_dir, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, sampler=sampler, eta=eta,
            display_rate=display_rate, latents=latents, use_gpu=use_gpu, enable_fp16=enable_fp16,
            frame_decoder=frame_decoder)

    @runnable
    def run_cmd(self, argvs):
        parser = argparse.ArgumentParser(prog="hub run stable_diffusion",
                                         description="Generate images from text with Stable Diffusion.")
        parser.add_argument("--text_prompts", type=str, help="the prompt (or use --prompts_file)")
        parser.add_argument("--prompts_file", type=str, help="a text file with one prompt per line")
        parser.add_argument("--style", type=str, default=None, help="appended to each prompt, e.g. 'oil painting'")
        parser.add_argument("--artist", type=str, default=None, help="appended to each prompt as an artist name")
        parser.add_argument("--width_height", type=int, nargs=2, default=[512, 512], metavar=("W", "H"),
                            help="image size, multiples of 8 (default 512 512)")
        parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one)")
        parser.add_argument("--batch_size", type=int, default=1, help="images per prompt")
        parser.add_argument("--num_inference_steps", type=int, default=50, help="sampling steps")
        parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
        parser.add_argument("--negative_prompt", type=str, default=None, help="what the image should not show")
        parser.add_argument("--sampler", type=str, default="plms",
                            help="plms, ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras")
        parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
        parser.add_argument("--display_rate", type=int, default=5, help="keep a frame every N steps (0: none)")
        parser.add_argument("--frame_decoder", type=str, default="preview", help="frames by 'preview' or 'vae'")
        parser.add_argument("--output_dir", type=str, default="stable_diffusion_out", help="where images go")
        parser.add_argument("--model", type=str, default=None,
                            help=f"weights: folder, .safetensors/.ckpt file or Hub repo id (default: ${MODEL_ENV_VAR})")
        parser.add_argument("--use_gpu", type=int, default=1, help="1: use a GPU when one is visible")
        parser.add_argument("--cpu_engine", type=str, default="inference",
                            help="on CPU: 'inference' (Paddle Inference + oneDNN, faster) or 'eager'")
        parser.add_argument("--enable_fp16", type=int, default=0, help="1: fp16 UNet and text encoder on GPU")
        args = parser.parse_args(argvs)
        if args.prompts_file:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        elif args.text_prompts:
            prompts = args.text_prompts
        else:
            parser.error("give --text_prompts or --prompts_file")
        if args.model or args.cpu_engine != self.text_to_image.cpu_engine:
            self.text_to_image = TextToImage(args.model or self.text_to_image.model_source, args.cpu_engine)
        documents = self.generate_image(
            prompts, style=args.style, artist=args.artist, width_height=args.width_height, seed=args.seed,
            batch_size=args.batch_size, output_dir=args.output_dir, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, sampler=args.sampler,
            eta=args.eta, display_rate=args.display_rate, use_gpu=bool(args.use_gpu),
            enable_fp16=bool(args.enable_fp16), frame_decoder=args.frame_decoder)
        files = [path for document in documents for path in document.tags["files"]]
        print(f"saved {len(files)} images in {os.path.abspath(args.output_dir)}:")
        for path in files:
            print(f"  {path}")
        return files

    @serving
    def serving_method(self, text_prompts=None, **kwargs):
        """JSON body -> generate_image keyword arguments; the result as a base64 DocumentArray."""
        allowed = set(inspect.signature(TextToImage.generate_image).parameters) - {
            "self", "text_prompts", "progress", "output_dir"}
        if "output_dir" in kwargs:
            raise ValueError("output_dir cannot be set through serving: the server writes no files; "
                             "save the returned images on the client")
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; accepted: text_prompts, {', '.join(sorted(allowed))}")
        if text_prompts is None:
            raise ValueError("the request body needs text_prompts (a string or a list of strings)")
        return self.generate_image(text_prompts=text_prompts, output_dir=None, **kwargs).to_base64()
