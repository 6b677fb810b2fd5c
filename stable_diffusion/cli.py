"""`hub run stable_diffusion`: its options, derived from GenerationOptions' fields (options.py)."""
import argparse
import ast
import dataclasses

from stable_diffusion.options import GenerationOptions
from stable_diffusion.parameters import portable_model, read_png_parameters
from stable_diffusion.samplers import SAMPLERS


def parse_bool(text):
    """True/False as the original module's CLI takes them (`ast.literal_eval`), and 1/0."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if value in (True, False):  # 1 and 0 included
        return bool(value)
    raise argparse.ArgumentTypeError(f"expected True, False, 1 or 0, got {text!r}")


def build_parser(model_env_var):
    parser = argparse.ArgumentParser(prog="hub run stable_diffusion",
                                     description="Generate images from text with Stable Diffusion.")
    parser.add_argument("--text_prompts", type=str, help="the prompt (or use --prompts_file)")
    parser.add_argument("--prompts_file", type=str, help="a text file with one prompt per line")
    parser.add_argument("--style", type=str, default=None, help="appended to each prompt, e.g. 'oil painting'")
    parser.add_argument("--artist", type=str, default=None, help="appended to each prompt as an artist name")
    for option in dataclasses.fields(GenerationOptions):
        cli = dict(option.metadata["cli"])
        if "type" not in cli:
            continue  # not given on a command line (latents)
        if cli["type"] == "bool":
            cli["type"] = parse_bool
        if option.name == "sampler":
            cli["choices"] = SAMPLERS
        flag = cli.pop("flag", f"--{option.name}")
        default = None if cli.get("action") == "append" else option.default  # argparse appends to a list
        parser.add_argument(flag, dest=option.name, default=default, help=option.metadata["help"], **cli)
    parser.add_argument("--model", type=str, default=None,
                        help="weights: 'demo' (the small emoji model shipped with the module), a diffusers "
                             f"folder, a .safetensors/.ckpt file or a Hub repo id (default: ${model_env_var}, "
                             "else stable-diffusion-v1-5)")
    parser.add_argument("--vae", type=str, default=None,
                        help="a VAE of its own instead of the model's: a .safetensors/.ckpt file or a diffusers VAE "
                             "folder (e.g. vae-ft-mse-840000); default: $STABLE_DIFFUSION_VAE, else the model's")
    parser.add_argument("--prediction_type", type=str, default=None, choices=("epsilon", "v_prediction"),
                        help="what an SD 2.x single file's UNet predicts, when the file cannot tell (default: the "
                             ".yaml beside it, else v_prediction as SD 2.x 768 px models; 512 px base: epsilon)")
    parser.add_argument("--variant", type=str, default=None,
                        help="for a Hub repo id: the weights variant to fetch, e.g. fp16 (half the download)")
    parser.add_argument("--from_png", type=str, default=None,
                        help="make a picture again from a PNG's saved parameters (this module's or A1111's): its "
                             "prompt, negative prompt, steps, sampler, guidance, seed and size, and its model when "
                             "that is 'demo' or a Hub id; options given beside it win")
    parser.add_argument("--cpu_engine", type=str, default="inference", choices=("inference", "eager"),
                        help="on CPU: 'inference' (Paddle Inference + oneDNN, faster) or 'eager'")
    return parser


def parse_arguments(argvs, model_env_var):
    """-> (prompts, options as generate_image keywords, loading settings)."""
    parser = build_parser(model_env_var)
    args = parser.parse_args(argvs)
    if args.from_png:
        saved, model = read_png_parameters(args.from_png)
        parser.set_defaults(**saved)
        args = parser.parse_args(argvs)  # again: what the command line gives beats what the PNG says
        if args.model is None and portable_model(model):
            args.model = model
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif args.text_prompts:
        prompts = args.text_prompts
    else:
        parser.error("give --text_prompts or --prompts_file")
    values = vars(args)
    options = {f.name: values[f.name] for f in dataclasses.fields(GenerationOptions) if f.name in values}
    options.update(style=args.style, artist=args.artist)
    loading = {"model": args.model, "variant": args.variant, "cpu_engine": args.cpu_engine, "vae": args.vae,
               "prediction_type": args.prediction_type}
    return prompts, options, loading


class RunFromClassOrInstance:
    """`_run_func` for `hub run`. Given a folder (`hub run path/to/stable_diffusion`, or `hub run
    stable_diffusion` where ./stable_diffusion/ exists, as in this repo's root), PaddleHub loads the
    module class and calls `_run_func` on the class itself (paddlehub/commands/run.py): then make an
    instance first. On an instance, its `run_cmd`."""

    def __get__(self, instance, owner):
        if instance is None:
            return lambda argvs: owner().run_cmd(argvs)
        return instance.run_cmd
