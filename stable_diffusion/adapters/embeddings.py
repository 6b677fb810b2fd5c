"""Textual-inversion embeddings: a name whose tokens, in a prompt, are replaced by learned vectors.

Files as people share them:
- A1111's `.pt` (`string_to_param: {"*": [n, D]}`), read by the restricted unpickler; its name is the
  file's stem, as in A1111;
- A1111's `.safetensors` (`emb_params: [n, D]`), named by the stem too;
- diffusers' `learned_embeds.bin` / `.safetensors` (`{token: [D] or [n, D]}`), named by its token.
The name is matched by its tokens (A1111's way), so it works inside weighting brackets too.
"""
import os

import numpy as np

from stable_diffusion.loading.checkpoint_files import CheckpointError, read_safetensors, read_torch_pickle

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path):
    """-> (name, vectors float32 [n, D])."""
    if not os.path.isfile(path):
        raise CheckpointError(f"embedding file {path} does not exist")
    if not path.endswith(EMBEDDING_SUFFIXES):
        raise CheckpointError(f"{path}: an embedding is a {', '.join(EMBEDDING_SUFFIXES)} file")
    data = read_safetensors(path) if path.endswith(".safetensors") else read_torch_pickle(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold an embedding (a dict of vectors)")
    if "clip_l" in data or "clip_g" in data:
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l/clip_g vectors): SDXL is not supported")
    if isinstance(data.get("string_to_param"), dict):
        params = data["string_to_param"]
        if len(params) != 1:
            raise CheckpointError(f"{path} holds {len(params)} embeddings in string_to_param; expected one")
        name, vectors = stem, next(iter(params.values()))
    elif "emb_params" in data:
        name, vectors = stem, data["emb_params"]
    else:
        arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
        if len(arrays) != 1:
            raise CheckpointError(f"{path} is not a textual-inversion embedding: expected string_to_param, "
                                  f"emb_params or one token's vectors, found keys {sorted(data)[:5]}")
        name, vectors = next(iter(arrays.items()))
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not len(vectors):
        raise CheckpointError(f"{path}: the embedding's vectors have shape {list(vectors.shape)}, expected [n, width]")
    return name, vectors


def read_embeddings(paths):
    """{name: vectors} from textual-inversion files, read (and refused when broken) before any work."""
    named = {}
    for path in paths:
        name, vectors = read_embedding(path)
        if name in named:
            raise ValueError(f"two embeddings are named {name!r} (the second is {path}): rename one")
        named[name] = vectors
    return named


class Embeddings:
    """Embeddings by name, found in a prompt's tokens (prompts.chunk_prompt calls find_at)."""

    def __init__(self, named_vectors, tokenizer, width):
        self.names = sorted(named_vectors)
        self.name_of = {}
        self.by_first_token = {}
        for name, vectors in named_vectors.items():
            if vectors.shape[1] != width:
                family = {768: "SD 1.x", 1024: "SD 2.x"}.get(vectors.shape[1], f"width {vectors.shape[1]}")
                raise ValueError(f"embedding {name!r} is for {family} ({vectors.shape[1]} values per vector) but "
                                 f"this model's text encoder is {width} wide: use an embedding made for this model")
            ids = tokenizer.tokenize(name)
            if not ids:
                raise ValueError(f"embedding name {name!r} has no tokens: rename its file")
            self.by_first_token.setdefault(ids[0], []).append((ids, vectors))
            self.name_of[tuple(ids)] = name
        for candidates in self.by_first_token.values():
            candidates.sort(key=lambda candidate: -len(candidate[0]))  # the longest name first

    def used_in(self, texts, tokenizer):
        """The names of the embeddings these texts use, for the picture's tags."""
        used = set()
        for text in texts:
            tokens = tokenizer.tokenize(text)
            for position in range(len(tokens)):
                for ids, _ in self.by_first_token.get(tokens[position], ()):
                    if tokens[position:position + len(ids)] == ids:
                        used.add(self.name_of[tuple(ids)])
        return sorted(used)

    def find_at(self, tokens, position):
        """(vectors, the name's token count) if an embedding's name starts at tokens[position], else None."""
        for ids, vectors in self.by_first_token.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return vectors, len(ids)
        return None
