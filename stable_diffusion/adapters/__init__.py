"""What is added to a model from files of its own: LoRAs (lora.py), merged into the weights before they
run, and textual-inversion embeddings (embeddings.py), which stand in for a name's token embeddings."""
import os
import re


def adapter_keys(loras=(), vae=None):
    """{component: (files and settings)} merged into each component's weights: part of its CPU graph's
    cache key, so that no graph made with other weights is reused."""
    keys = {}
    lora_keys = tuple(part for path, weight in loras for part in (os.path.abspath(path), f"weight {float(weight)!r}"))
    if lora_keys:
        keys["unet"] = keys["text_encoder"] = lora_keys
    if vae:
        keys["vae"] = (os.path.abspath(vae),)
    return keys


LORA_DIR_ENV_VAR = "STABLE_DIFFUSION_LORA_DIR"
EMBEDDING_DIR_ENV_VAR = "STABLE_DIFFUSION_EMBEDDING_DIR"
# A name, as a prompt's <lora:name:w> tag or a served request gives it: a file name, never a path.
NAME = re.compile(r"\w[\w .+-]*")


def find_by_name(name, env_var, suffixes, what):
    """The file called `name` (with or without its suffix) in the folder that `env_var` names."""
    if not NAME.fullmatch(name) or name.strip(" .") != name:
        raise ValueError(f"{what} name {name!r} is not a plain file name (letters, digits, space, . + - _)")
    folder = os.environ.get(env_var)
    if not folder:
        raise ValueError(f"{what} {name!r} is given by name, but no folder is set to find it in: the operator sets "
                         f"{env_var}")
    for candidate in [name] + [name + suffix for suffix in suffixes]:
        path = os.path.join(folder, candidate)
        if candidate.endswith(suffixes) and os.path.isfile(path):
            return os.path.abspath(path)
    known = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(suffixes)) \
        if os.path.isdir(folder) else []
    raise ValueError(f"no {what} called {name!r} in {env_var} (known: {', '.join(known[:20]) or 'none'})")


def resolve_lora(name_or_path, names_only=False):
    """A LoRA's file: a path as given (Python, hub run), else a name looked up in $STABLE_DIFFUSION_LORA_DIR
    (always, for a served request)."""
    from stable_diffusion.adapters.lora import LORA_SUFFIXES
    if not names_only and (os.sep in name_or_path or os.path.isfile(name_or_path)):
        if not os.path.isfile(name_or_path):
            raise ValueError(f"LoRA file {name_or_path} does not exist")
        return os.path.abspath(name_or_path)
    return find_by_name(name_or_path, LORA_DIR_ENV_VAR, LORA_SUFFIXES, "LoRA")


def embedding_files(given=(), names_only=False):
    """The textual-inversion files a request may use: those given (paths, or names in the folder) and
    every one in $STABLE_DIFFUSION_EMBEDDING_DIR, as A1111 makes its folder's embeddings known."""
    from stable_diffusion.adapters.embeddings import EMBEDDING_SUFFIXES
    paths = []
    for entry in given:
        if not names_only and (os.sep in entry or os.path.isfile(entry)):
            if not os.path.isfile(entry):
                raise ValueError(f"embedding file {entry} does not exist")
            paths.append(os.path.abspath(entry))
        else:
            paths.append(find_by_name(entry, EMBEDDING_DIR_ENV_VAR, EMBEDDING_SUFFIXES, "embedding"))
    folder = os.environ.get(EMBEDDING_DIR_ENV_VAR)
    if folder and os.path.isdir(folder):
        paths += [os.path.abspath(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                  if n.endswith(EMBEDDING_SUFFIXES)]
    return list(dict.fromkeys(paths))
