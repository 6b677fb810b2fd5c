"""CLIP byte-level BPE tokenizer with Stable Diffusion's conventions.

Text is cleaned (HTML entities, whitespace) and lower-cased, split with CLIP's pattern, byte-encoded
and merged by rank; the result is wrapped in <|startoftext|> ... <|endoftext|>, truncated to 77 tokens
and padded with <|endoftext|> (49407), as diffusers' pipeline does with the SD v1 tokenizer.
"""
import functools
import html
import json
import os

import regex

BUNDLED_VOCAB_DIR = os.path.join(os.path.dirname(__file__), "clip_vocab")
SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache()
def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


class CLIPTokenizer:
    def __init__(self, vocab_file, merges_file, max_length=77, pad_token="<|endoftext|>"):
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file {path} is missing; a model folder's tokenizer/ "
                                        "needs vocab.json and merges.txt")
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.max_length = max_length
        self.bos_id = self.encoder["<|startoftext|>"]
        self.eos_id = self.encoder["<|endoftext|>"]
        if pad_token not in self.encoder:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = self.encoder[pad_token]
        self._cache = {}

    @classmethod
    def from_folder(cls, folder=None, pad_token="<|endoftext|>"):
        """The tokenizer of a diffusers model folder's `tokenizer/`, or the bundled vocabulary (SD 1.x and
        2.x share it; SD 2.x pads with "!")."""
        folder = folder or BUNDLED_VOCAB_DIR
        max_length = 77
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            max_length = min(int(config.get("model_max_length", max_length)), 77)
            pad = config.get("pad_token", pad_token)
            pad_token = pad["content"] if isinstance(pad, dict) else (pad or pad_token)
        return cls(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), max_length, pad_token)

    def bpe(self, token):
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def tokenize(self, text):
        """Text -> BPE ids, without the start/end tokens and without truncation."""
        text = html.unescape(html.unescape(text))
        text = " ".join(text.split()).lower()
        ids = []
        for piece in SPLIT_PATTERN.findall(text):
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(encoded))
        return ids

    def __call__(self, text):
        """Text -> exactly max_length ids: start, tokens (truncated), end, padding."""
        ids = [self.bos_id] + self.tokenize(text)[: self.max_length - 2] + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))
