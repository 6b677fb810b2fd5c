"""Prompts in AUTOMATIC1111's syntax: emphasis, BREAK, prompts longer than CLIP's 75 tokens, LoRA tags.

- `(word)` x1.1, `((word))` x1.21, `(word:1.3)`, `[word]` /1.1, `\\(` a literal bracket, an unclosed
  bracket reaching to the end; `BREAK` starts a new chunk (parse_emphasis).
- A prompt becomes chunks of 75 tokens, each wrapped in its own start and end token and encoded
  apart, then concatenated, as A1111 and ComfyUI do (chunk_prompt); the weights scale the encoder's
  output per token, and the chunk's mean is restored (pipeline.encode_text). A prompt of 75 tokens or
  fewer without brackets is one chunk of exactly the tokenizer's ids: today's image.
- `<lora:name:0.8>` asks for a LoRA (extract_lora_tags); the tag is removed from the text encoded.
- A textual-inversion name (adapters/embeddings.py) expands to its vectors where its tokens appear.

Not done as A1111 does: its default "comma padding backtrack" (a chunk ending within 20 tokens after a
comma is cut at the comma); chunks here are cut at 75 tokens exactly, as ComfyUI cuts them.
"""
import re
from dataclasses import dataclass, field

CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end tokens
ROUND_BRACKET, SQUARE_BRACKET = 1.1, 1 / 1.1
BREAK = "BREAK"
EMPHASIS_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal text
  | \\                      # a lone backslash: literal
  | \( | \[                 # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ':1.3)' closes a round bracket with that weight
  | \) | ]                  # a closing bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that closes nothing: plain text
""", re.X)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def parse_emphasis(text):
    """-> [(text, weight), ...] with runs of one weight merged; (BREAK, -1) where a BREAK stands.
    A1111's semantics (modules/prompt_parser.py, parse_prompt_attention)."""
    pieces = []  # [text, weight] lists, weights multiplied in place as brackets close
    round_opened, square_opened = [], []

    def multiply_since(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])  # a lone backslash is dropped, as in A1111
        elif token == "(":
            round_opened.append(len(pieces))
        elif token == "[":
            square_opened.append(len(pieces))
        elif weight is not None and round_opened:
            multiply_since(round_opened.pop(), float(weight))
        elif token == ")" and round_opened:
            multiply_since(round_opened.pop(), ROUND_BRACKET)
        elif token == "]" and square_opened:
            multiply_since(square_opened.pop(), SQUARE_BRACKET)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    pieces.append([BREAK, -1])
                pieces.append([part, 1.0])
    for start in round_opened:  # unclosed brackets reach to the end
        multiply_since(start, ROUND_BRACKET)
    for start in square_opened:
        multiply_since(start, SQUARE_BRACKET)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [tuple(piece) for piece in merged]


def extract_lora_tags(text):
    """-> (text without its `<lora:name:weight>` tags, [(name, weight), ...]); weight 1 when left out."""
    loras = []
    for match in LORA_TAG.finditer(text):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            loras.append((name, float(weight)))
        except ValueError:
            raise ValueError(f"the prompt's tag {match.group(0)!r} has weight {weight!r}, not a number: "
                             "write <lora:name:0.8>") from None
    return LORA_TAG.sub("", text), loras


@dataclass
class Chunk:
    """One encoder input: start token, 75 tokens (padded), end token; a weight per position; and the
    textual-inversion vectors that replace the token embeddings at some positions."""
    tokens: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    vectors: list = field(default_factory=list)  # (position, array [n, D])


def chunk_prompt(text, tokenizer, embeddings=None):
    """The prompt's chunks for the text encoder, each of tokenizer.max_length ids."""
    chunks, chunk = [], Chunk()
    length = min(CHUNK_TOKENS, tokenizer.max_length - 2)

    def close_chunk():
        nonlocal chunk
        padding = length - len(chunk.tokens)
        chunk.tokens = [tokenizer.bos_id] + chunk.tokens + [tokenizer.eos_id] + [tokenizer.pad_id] * padding
        chunk.weights = [1.0] + chunk.weights + [1.0] * (padding + 1)
        chunk.vectors = [(position + 1, vectors) for position, vectors in chunk.vectors]
        chunks.append(chunk)
        chunk = Chunk()

    for piece, weight in parse_emphasis(text):
        if weight == -1 and piece == BREAK:
            close_chunk()
            continue
        tokens = tokenizer.tokenize(piece)
        position = 0
        while position < len(tokens):
            if len(chunk.tokens) == length:
                close_chunk()
            found = embeddings.find_at(tokens, position) if embeddings else None
            if found is None:
                chunk.tokens.append(tokens[position])
                chunk.weights.append(weight)
                position += 1
                continue
            vectors, name_length = found
            if len(vectors) > length:
                raise ValueError(f"an embedding in the prompt has {len(vectors)} vectors, more than the "
                                 f"{length} a chunk holds")
            if len(chunk.tokens) + len(vectors) > length:
                close_chunk()
            chunk.vectors.append((len(chunk.tokens), vectors))
            chunk.tokens += [tokenizer.eos_id] * len(vectors)  # placeholders: their embeddings are replaced
            chunk.weights += [weight] * len(vectors)
            position += name_length
    if chunk.tokens or not chunks:
        close_chunk()
    return chunks
