"""What is added to a model from files of its own: LoRAs (lora.py), merged into the weights before they
run, and textual-inversion embeddings (embeddings.py), which stand in for a name's token embeddings."""
import os


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
