"""What one request may ask for: pixels per image, images, steps, and their product (the work).

A served request (hub serving) is held to the limits below unless the server's operator changes them
through the environment variables; the Python API and `hub run` are unlimited unless those variables
are set. The work is megapixels x images x UNet steps: a 512x512 image with 50 steps is 13.1, about
10 minutes with SD v1.5 on a 2-core CPU (README, Performance). Peak memory grows with pixels x the
images of one prompt's batch: the pixel and image limits together hold it at about a 512 px batch of 9
(the UNet's activations beside the 3.4 GB of weights).
"""
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

# limit name -> (environment variable, served default, what it counts)
LIMITS = {
    "max_pixels": ("STABLE_DIFFUSION_MAX_PIXELS", 768 * 768, "pixels per image (width x height)"),
    "max_images": ("STABLE_DIFFUSION_MAX_IMAGES", 4, "images per request (prompts x batch_size)"),
    "max_steps": ("STABLE_DIFFUSION_MAX_STEPS", 150, "UNet steps per image (num_inference_steps x strength)"),
    "max_work": ("STABLE_DIFFUSION_MAX_WORK", 13.2, "work: megapixels x images x steps"),
}


def number_from_environment(variable, cast=float, zero_allowed=False):
    """The variable's number, None when unset; a ValueError naming it when it is not a number above 0
    (or of 0 or more)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
        raise ValueError(f"{variable}={text!r} is not a {'number of 0 or more' if zero_allowed else 'positive number'}")
    return value


@dataclass(frozen=True)
class RequestBudget:
    """None: unlimited."""
    max_pixels: Optional[int] = None
    max_images: Optional[int] = None
    max_steps: Optional[int] = None
    max_work: Optional[float] = None

    @classmethod
    def from_environment(cls, served=False):
        """The variables that are set; for a server, the served defaults for the others."""
        values = {}
        for name, (variable, default, _) in LIMITS.items():
            value = number_from_environment(variable, float if name == "max_work" else int)
            values[name] = value if value is not None else (default if served else None)
        return cls(**values)

    def check(self, width, height, images, steps):
        """ValueError naming the first limit the request passes, the figure asked and the variable."""
        asked = {"max_pixels": width * height, "max_images": images, "max_steps": steps,
                 "max_work": round(width * height / 1e6 * images * steps, 2)}
        for limit in fields(self):
            allowed = getattr(self, limit.name)
            if allowed is not None and asked[limit.name] > allowed:
                variable, _, counts = LIMITS[limit.name]
                raise ValueError(
                    f"request over the server's budget: {counts} is {asked[limit.name]} "
                    f"({width}x{height}, {images} image(s), {steps} step(s)), the limit is {allowed}; "
                    f"ask for less, or the server's operator raises {variable}")
