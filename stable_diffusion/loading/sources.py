"""Where weights come from: a local folder or file, a Hub repo id fetched into the Hugging Face cache."""
import os
import re

from stable_diffusion.loading.checkpoint_files import CheckpointError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# `model="demo"`: the small emoji model shipped inside the module (demo_model/README.md), for offline use.
DEMO_MODEL = "demo"
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo_model")


def download_from_hub(repo_id, variant=None):
    """Fetch only what inference needs into the Hugging Face cache (HF_HOME); returns the folder."""
    from huggingface_hub import snapshot_download
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                f"text_encoder/model{suffix}", f"unet/diffusion_pytorch_model{suffix}",
                f"vae/diffusion_pytorch_model{suffix}"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, use the demo model shipped with the module (`--model demo`, `model=\"demo\"`) "
            "or point at local weights: a diffusers model folder or a .safetensors/.ckpt file, as `model=` or "
            "the STABLE_DIFFUSION_MODEL environment variable.") from None


def resolve_source(source=None, variant=None):
    """The local folder or file behind a folder, a file or a Hub repo id (default: SD v1.5)."""
    source = source or DEFAULT_MODEL
    if source == DEMO_MODEL:
        return DEMO_MODEL_DIR
    if os.path.isdir(source):
        return source
    if os.path.isfile(source):
        if not source.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise CheckpointError(f"{source}: expected a .safetensors or .ckpt file, or a diffusers folder")
        return source
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return download_from_hub(source, variant)
    raise CheckpointError(f"model {source!r} is neither an existing folder or file nor a Hub repo id "
                          "(owner/name)")
