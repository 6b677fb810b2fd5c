"""Every knob of `generate_image`, its default and its check, written once.

`GenerationOptions` validates on construction, so a request is refused before any work. `hub run`'s
options (cli.py) and serving's accepted keys (text_to_image.py) are derived from its fields. None for
width_height means the model's native size (or the init image's); None for a knob in MODEL_DEFAULTS
means what the model folder's `generation_defaults.json` says (the demo model's), else MODEL_DEFAULTS.
"""
import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from typing import Optional

from stable_diffusion.images import read_image
from stable_diffusion.models import token_merging
from stable_diffusion.samplers import SAMPLERS

FRAME_DECODERS = ("preview", "vae")
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_BATCH, MAX_STEPS = 64, 1000
MAX_CLIP_SKIP = 12  # SD 1.x's text encoder has 12 layers (the pipeline checks a model's own count)
# The knobs a model folder may set for itself (generation_defaults.json), and their values elsewhere.
MODEL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.5, "sampler": "plms"}
# fast=True: fewer and cheaper UNet evaluations, for what a request leaves unset. Chosen on the demo
# model by bench/demo_quality.py (module README, "Fewer UNet evaluations"): UniPC's 10 steps with a full
# UNet pass every 2nd step found 73% of the named emoji among the 5 nearest (its 25-step defaults: 70%;
# every 3rd step: 70%, and one of the six that CI checks fell to rank 21); cutting guidance off at 40%
# as well lost 3 points.
FAST_PRESET = {"sampler": "unipc", "num_inference_steps": 10, "deep_cache_interval": 2}


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_lora(entry):
    """(file or name, weight) from a pair, or from 'FILE:WEIGHT' / 'FILE' (weight 1) as hub run gives it."""
    if isinstance(entry, str):
        name, _, weight = entry.rpartition(":")
        if not name or not re.fullmatch(r"\s*[+-]?[\d.]+\s*", weight):
            name, weight = entry, "1"
        entry = (name, float(weight))
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str) or not entry[0]
            or not _is_number(entry[1])):
        raise ValueError(f"a LoRA is given as (file or name, weight), e.g. ('style.safetensors', 0.8); got {entry!r}")
    if not -10 <= entry[1] <= 10:
        raise ValueError(f"LoRA weight {entry[1]} for {entry[0]!r} is outside [-10, 10] (1 is typical)")
    return entry[0], float(entry[1])


def knob(default, help, **cli):
    """A field with its `hub run` help text; `cli` holds argparse settings other than the type."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class GenerationOptions:
    width_height: Optional[tuple] = knob(
        None, "image size [width, height], multiples of 8 (default: the model's native size, 512x512 for SD "
        "v1)", nargs=2, metavar=("W", "H"), type=int)
    seed: Optional[int] = knob(None, "random seed (default: a random one, recorded in the tags)", type=int)
    batch_size: int = knob(1, "images per prompt", type=int)
    num_inference_steps: Optional[int] = knob(
        None, f"sampling steps (default: the model's, else {MODEL_DEFAULTS['num_inference_steps']})", type=int)
    guidance_scale: Optional[float] = knob(
        None, f"classifier-free guidance scale (default: the model's, else {MODEL_DEFAULTS['guidance_scale']}; "
        "1 or less: the prompt alone)", type=float)
    negative_prompt: Optional[str] = knob(None, "what the image should not show", type=str)
    guidance_cutoff: Optional[float] = knob(
        None, "stop classifier-free guidance after this fraction of the steps, (0, 1): the later steps run one "
        "UNet pass instead of two (diffusers' SDCFGCutoffCallback); default: guide every step", type=float)
    sampler: Optional[str] = knob(None, f"one of {', '.join(SAMPLERS)} (default: the model's, else "
                                  f"{MODEL_DEFAULTS['sampler']})", type=str)
    eta: float = knob(0.0, "DDIM noise (0: deterministic)", type=float)
    display_rate: int = knob(5, "keep a frame every N steps (0: only the final image)", type=int)
    frame_decoder: str = knob("preview", "frames by 'preview' (a linear map, fast) or 'vae'", type=str)
    latents: Optional[object] = knob(None, "initial noise [batch_size, 4, H/f, W/f] (f: the VAE's factor, 8 for SD) "
                                        "instead of the seed's")
    output_dir: Optional[str] = knob("stable_diffusion_out", "where images go (None: save nothing)", type=str)
    init_image: Optional[object] = knob(
        None, "image-to-image: the starting picture (a file); its size rounded down to a multiple of 8 "
        "unless --width_height is given", type=str)
    strength: float = knob(0.8, "image-to-image: how much of the picture is repainted, (0, 1] (1: all of it)",
                           type=float)
    mask_image: Optional[object] = knob(
        None, "inpainting: a mask of init_image's size (a file); white is repainted, black kept", type=str)
    loras: tuple = knob(
        (), "LoRAs merged into the weights: (file or name, weight) pairs; a name is a file in the folder "
        "$STABLE_DIFFUSION_LORA_DIR (a prompt's <lora:name:0.8> tag too); hub run: --lora FILE:WEIGHT, repeated",
        flag="--lora", action="append", metavar="FILE:WEIGHT", type=str)
    embeddings: tuple = knob(
        (), "textual-inversion files; the name (the file's stem, or its token) in a prompt stands for its "
        "vectors; every file in $STABLE_DIFFUSION_EMBEDDING_DIR is known by name too; hub run: --embedding FILE, "
        "repeated", flag="--embedding", action="append", metavar="FILE", type=str)
    clip_skip: int = knob(1, "the text encoder layer whose output guides, counted from the end: 1 the last, 2 the "
                          "one before (as anime models expect)", type=int)
    deep_cache_interval: Optional[int] = knob(
        None, "DeepCache: a full UNet pass every N steps (N >= 2), between them only its shallow branch on the "
        "deep features kept from the last full pass (the DeepCache package's branch 0); default: every step full",
        type=int)
    token_merging: Optional[float] = knob(
        None, f"ToMe (token merging, tomesd's defaults): merge this fraction of the tokens, (0, "
        f"{token_merging.MAX_RATIO:g}], before each self-attention at full latent size (0.5 is typical); the CPU "
        "engine traces UNet graphs of their own for each ratio, once; default: no merging", type=float)
    fast: bool = knob(False, f"fewer UNet evaluations for what is left unset: {FAST_PRESET} (True/False or 1/0)",
                      type="bool")
    use_gpu: bool = knob(True, "use a GPU when one is visible (True/False or 1/0)", type="bool")
    enable_fp16: bool = knob(False, "fp16 UNet and text encoder on GPU (True/False or 1/0)", type="bool")

    def __post_init__(self):
        wh = self.width_height
        if wh is not None:
            if not isinstance(wh, (list, tuple)) or len(wh) != 2 or not all(_is_int(v) for v in wh):
                raise ValueError(f"width_height must be two integers [width, height], got {wh!r}")
            for side in wh:
                if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
                    raise ValueError(f"width and height must be multiples of 8 between {MIN_SIDE} and {MAX_SIDE}, "
                                     f"got {list(wh)}; try {[min(max(v // 8 * 8, MIN_SIDE), MAX_SIDE) for v in wh]}")
            object.__setattr__(self, "width_height", tuple(wh))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 32):
            raise ValueError(f"seed must be an integer from 0 to 2**32-1, or None for a random one; got {self.seed!r}")
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be an integer from 1 to {MAX_BATCH}, got {self.batch_size!r}")
        steps = self.num_inference_steps
        if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
            raise ValueError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        guidance = self.guidance_scale
        if guidance is not None and (not _is_number(guidance) or not 0 <= guidance <= 100):
            raise ValueError(f"guidance_scale must be a number from 0 to 100 (7.5 is typical), got {guidance!r}")
        interval = self.deep_cache_interval
        if interval is not None and (not _is_int(interval) or not 2 <= interval <= MAX_STEPS):
            raise ValueError(f"deep_cache_interval must be an integer of 2 or more (3 is typical), or None for a full "
                             f"UNet pass every step; got {interval!r}")
        ratio = self.token_merging
        if ratio is not None and (not _is_number(ratio) or not 0 < ratio <= token_merging.MAX_RATIO):
            raise ValueError(f"token_merging must be a fraction of the tokens in (0, {token_merging.MAX_RATIO:g}] "
                             f"(0.5 is typical), or None for no merging; got {ratio!r}")
        if not isinstance(self.fast, bool):
            raise ValueError(f"fast must be True or False, got {self.fast!r}")
        cutoff = self.guidance_cutoff
        if cutoff is not None and (not _is_number(cutoff) or not 0 < cutoff < 1):
            raise ValueError(f"guidance_cutoff must be a fraction of the steps in (0, 1) (0.4 is typical), or None to "
                             f"guide every step; got {cutoff!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not _is_number(self.eta) or not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be a number from 0 to 1 (used by the ddim sampler), got {self.eta!r}")
        if not _is_int(self.display_rate) or self.display_rate < 0:
            raise ValueError(f"display_rate must be an integer >= 0 (0: no intermediate frames), "
                             f"got {self.display_rate!r}")
        if self.output_dir is not None and (not isinstance(self.output_dir, str) or not self.output_dir):
            raise ValueError(f"output_dir must be a folder path, or None to save nothing; got {self.output_dir!r}")
        if self.frame_decoder not in FRAME_DECODERS:
            raise ValueError(f"frame_decoder must be one of {FRAME_DECODERS}, got {self.frame_decoder!r}")
        if not _is_number(self.strength) or not 0 < self.strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1] (1 repaints everything), got {self.strength!r}")
        if self.init_image is not None:
            image = read_image(self.init_image, "init_image", "RGB")
            height, width = image.shape[:2]
            if wh is None and (max(width, height) // 8 * 8 > MAX_SIDE or min(width, height) // 8 * 8 < MIN_SIDE):
                raise ValueError(f"init_image is {width}x{height}: each side must be from {MIN_SIDE} to {MAX_SIDE} px "
                                 "(rounded down to a multiple of 8); resize it or give width_height")
            object.__setattr__(self, "init_image", image)
        object.__setattr__(self, "loras", tuple(parse_lora(entry) for entry in self.loras or ()))
        embeddings = self.embeddings or ()
        if isinstance(embeddings, str) or not all(isinstance(e, str) and e for e in embeddings):
            raise ValueError(f"embeddings must be a list of files (or names), got {self.embeddings!r}")
        object.__setattr__(self, "embeddings", tuple(embeddings))
        if not _is_int(self.clip_skip) or not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise ValueError(f"clip_skip must be an integer from 1 (the last layer) to {MAX_CLIP_SKIP}, "
                             f"got {self.clip_skip!r}")
        if self.mask_image is not None:
            if self.init_image is None:
                raise ValueError("mask_image needs an init_image: the picture whose masked part is repainted")
            mask = read_image(self.mask_image, "mask_image", "L")
            if mask.shape != self.init_image.shape[:2]:
                raise ValueError(f"mask_image is {mask.shape[1]}x{mask.shape[0]} but init_image is "
                                 f"{self.init_image.shape[1]}x{self.init_image.shape[0]}: give a mask of the "
                                 "image's size")
            object.__setattr__(self, "mask_image", mask)

    def with_model_defaults(self, native_size, model_defaults):
        """The options with every None that means "the model's" (or the fast preset's) filled in."""
        preset = FAST_PRESET if self.fast else {}
        filled = {name: preset.get(name, model_defaults.get(name, value)) for name, value in MODEL_DEFAULTS.items()
                  if getattr(self, name) is None}
        filled.update({name: value for name, value in preset.items()
                       if name not in MODEL_DEFAULTS and getattr(self, name) is None})
        if self.width_height is None and self.init_image is not None:
            height, width = self.init_image.shape[:2]
            filled["width_height"] = (width // 8 * 8, height // 8 * 8)
        elif self.width_height is None:
            filled["width_height"] = tuple(native_size)
        return dataclasses.replace(self, **filled)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenerationOptions))
DEFAULTS = GenerationOptions()


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
