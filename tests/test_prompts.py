"""Prompts as A1111 reads them (emphasis, BREAK, over 75 tokens, LoRA tags), clip_skip and textual
inversion: worked examples of A1111's parser, and numbers against transformers/diffusers."""
import copy

import numpy as np
import pytest
import torch

from reference import SCHEDULER, VOCAB_DIR, max_relative_error
from stable_diffusion.adapters.embeddings import Embeddings, read_embedding
from stable_diffusion.loading import load_models
from stable_diffusion.pipeline import StableDiffusionPipeline
from stable_diffusion.prompts import BREAK, chunk_prompt, extract_lora_tags, parse_emphasis

# A1111's own worked examples (modules/prompt_parser.py, parse_prompt_attention's docstring).
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a cat BREAK a dog", [("a cat", 1.0), (BREAK, -1), ("a dog", 1.0)]),
    ("[[faded]] (word:0.5) \\\\ end", [("faded", 1 / 1.1 / 1.1), (" ", 1.0), ("word", 0.5), (" \\ end", 1.0)]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_emphasis_parsed_as_a1111(text, expected):
    got = parse_emphasis(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_lora_tags_taken_out_of_the_prompt():
    assert extract_lora_tags("a castle <lora:ghibli_style:0.8>, <lora:detail> sunset") == (
        "a castle ,  sunset", [("ghibli_style", 0.8), ("detail", 1.0)])
    with pytest.raises(ValueError, match="not a number"):
        extract_lora_tags("<lora:style:strong>")


@pytest.fixture(scope="module")
def tokenizer():
    from stable_diffusion.tokenizer import CLIPTokenizer
    return CLIPTokenizer.from_folder()


LONG_PROMPT = ", ".join(f"detail number {i}" for i in range(40))  # 159 tokens


def test_chunks_of_75_tokens_each_wrapped(tokenizer):
    tokens = tokenizer.tokenize(LONG_PROMPT)
    chunks = chunk_prompt(LONG_PROMPT, tokenizer)
    assert len(tokens) > 150 and len(chunks) == 3
    for i, chunk in enumerate(chunks):
        assert len(chunk.tokens) == 77 and chunk.tokens[0] == tokenizer.bos_id
        assert chunk.tokens[1:76][:len(tokens[75 * i:75 * (i + 1)])] == tokens[75 * i:75 * (i + 1)]
    assert chunks[0].tokens[76] == tokenizer.eos_id
    short = chunk_prompt("a photo of a cat", tokenizer)
    assert len(short) == 1 and short[0].tokens == tokenizer("a photo of a cat")  # today's ids, exactly
    broken = chunk_prompt("a cat BREAK a dog", tokenizer)
    assert [c.tokens for c in broken] == [tokenizer("a cat"), tokenizer("a dog")]


@pytest.fixture(scope="module")
def pipeline(sd1_folder):
    return StableDiffusionPipeline(load_models(sd1_folder), engine="eager")


def reference_chunk_outputs(text_encoder, ids, hidden_layer=-1):
    with torch.no_grad():
        out = text_encoder(torch.from_numpy(np.array(ids, np.int64)), output_hidden_states=True)
        return text_encoder.final_layer_norm(out.hidden_states[hidden_layer]).numpy() \
            if hidden_layer != -1 else out.last_hidden_state.numpy()


@pytest.mark.parametrize("engine", ["eager", "inference"])
def test_long_weighted_prompt_matches_a1111_arithmetic(sd1_folder, sd1_reference, tokenizer, engine):
    """Each chunk through the reference encoder apart, then A1111's emphasis: outputs scaled by the
    token weights, the chunk's mean restored."""
    prompt = "(" + LONG_PROMPT + ":1.3) BREAK a [quiet] lake"
    ours = StableDiffusionPipeline(load_models(sd1_folder), engine=engine).encode_text([prompt, ""]).numpy()
    assert np.abs(ours).max() > 0
    parts = [(LONG_PROMPT, 1.3), ("a ", 1.0), ("quiet", 1 / 1.1), (" lake", 1.0)]
    tokens, weights = [], []
    for text, weight in parts[:1]:
        ids = tokenizer.tokenize(text)
        tokens, weights = ids, [weight] * len(ids)
    chunk_ids, chunk_weights = [], []
    for start in range(0, len(tokens), 75):
        window = tokens[start:start + 75]
        chunk_ids.append([49406] + window + [49407] * (76 - len(window)))
        chunk_weights.append([1.0] + weights[start:start + 75] + [1.0] * (76 - len(window)))
    lake = [(tokenizer.tokenize(t), w) for t, w in parts[1:]]
    lake_ids = [i for ids, _ in lake for i in ids]
    chunk_ids.append([49406] + lake_ids + [49407] * (76 - len(lake_ids)))
    chunk_weights.append([1.0] + [w for ids, w in lake for _ in ids] + [1.0] * (76 - len(lake_ids)))
    z = reference_chunk_outputs(sd1_reference["text_encoder"], chunk_ids)
    for row, w in enumerate(chunk_weights):
        mean = z[row].mean()
        z[row] = z[row] * np.array(w, np.float32)[:, None]
        z[row] = z[row] * (mean / z[row].mean())
    expected = z.reshape(1, -1, z.shape[-1])
    empty = reference_chunk_outputs(sd1_reference["text_encoder"], [tokenizer("")])
    assert ours.shape == (2, 77 * len(chunk_ids), 32)
    error = max_relative_error(ours[:1], expected)
    print(f"{engine}: {len(chunk_ids)} chunks, max relative error {error:.2e}")
    assert error < 1e-4
    # the negative prompt padded to as many chunks with the empty prompt's encoding
    assert max_relative_error(ours[1], np.concatenate([empty[0]] * len(chunk_ids))) < 1e-4


def reference_pipeline(sd1_reference, text_encoder=None, tokenizer=None):
    from diffusers import PNDMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    from transformers import CLIPTokenizer
    tokenizer = tokenizer or CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)
    return Reference(vae=sd1_reference["vae"], text_encoder=text_encoder or sd1_reference["text_encoder"],
                     tokenizer=tokenizer, unet=sd1_reference["unet"], scheduler=PNDMScheduler.from_config(SCHEDULER),
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def images_match(ours, reference, prompt, latents, embeddings=None, clip_skip=1, reference_embeds=None):
    expected = reference(None if reference_embeds else prompt, height=64, width=64, num_inference_steps=4,
                         guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np",
                         **(reference_embeds or {})).images
    expected = (expected * 255).round().astype(np.uint8)
    images, _ = ours(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=7.5, sampler="plms",
                     latents=latents, progress=False, clip_skip=clip_skip, embeddings=embeddings)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    assert expected.std() > 5
    return difference


def test_clip_skip_2_is_the_penultimate_layer(pipeline, sd1_reference, tokenizer):
    """A1111 counts the last layer as 1, so 2 is diffusers' clip_skip=1: the layer before the last, then
    the final norm. (diffusers 0.42's own clip_skip path reads `text_encoder.text_model`, which
    transformers 5 no longer has, so the reference embeddings are made here as diffusers makes them.)"""
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    prompt = "an owl in a tree"
    embeds = {name: torch.from_numpy(reference_chunk_outputs(sd1_reference["text_encoder"], [tokenizer(text)], -2))
              for name, text in (("prompt_embeds", prompt), ("negative_prompt_embeds", ""))}
    difference = images_match(pipeline, reference_pipeline(sd1_reference), prompt, latents, clip_skip=2,
                              reference_embeds=embeds)
    print(f"clip_skip 2: max uint8 difference {difference}")
    assert difference <= 2
    assert max_relative_error(pipeline.encode_text([prompt], clip_skip=2).numpy(), embeds["prompt_embeds"].numpy()) \
        < 1e-4
    assert not np.allclose(pipeline.encode_text([prompt]).numpy(), embeds["prompt_embeds"].numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="clip_skip must be from 1"):
        pipeline.encode_text([prompt], clip_skip=3)  # the tiny encoder has 2 layers


def write_embedding(path, kind, vectors):
    from safetensors.torch import save_file
    tensor = torch.from_numpy(vectors)
    if kind == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensor.requires_grad_()},
                    "name": "ignored-name", "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, path)
    elif kind == "a1111_safetensors":
        save_file({"emb_params": tensor}, path)
    else:  # diffusers' learned_embeds.bin
        torch.save({"mytoken": tensor}, path)
    return path


@pytest.mark.parametrize("kind,file_name,vectors", [("a1111_pt", "mytoken.pt", 3),
                                                     ("a1111_safetensors", "mytoken.safetensors", 2),
                                                     ("diffusers", "learned_embeds.bin", 1)])
def test_textual_inversion_matches_diffusers(pipeline, sd1_reference, tmp_path, kind, file_name, vectors):
    from transformers import CLIPTokenizer
    values = np.random.default_rng(7).standard_normal((vectors, 32)).astype(np.float32)
    path = write_embedding(str(tmp_path / file_name), kind, values)
    name, read = read_embedding(path)
    assert name == "mytoken" and read.shape == (vectors, 32)
    reference = reference_pipeline(sd1_reference, copy.deepcopy(sd1_reference["text_encoder"]),
                                   CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt",
                                                 model_max_length=77))
    reference.load_textual_inversion(path, token="mytoken")
    embeddings = Embeddings({name: read}, pipeline.models.tokenizer, 32)
    prompt = "a photo of mytoken on a beach"
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    difference = images_match(pipeline, reference, prompt, latents, embeddings=embeddings)
    print(f"{kind}, {vectors} vectors: max uint8 difference {difference}")
    assert difference <= 2
    without = pipeline.encode_text([prompt]).numpy()
    assert not np.allclose(without, pipeline.encode_text([prompt], embeddings=embeddings).numpy())


def test_embedding_for_another_width_is_refused(tmp_path, tokenizer):
    path = write_embedding(str(tmp_path / "wide.safetensors"), "a1111_safetensors", np.ones((2, 1024), np.float32))
    with pytest.raises(ValueError, match="SD 2.x .* 768 wide"):
        Embeddings(dict([read_embedding(path)]), tokenizer, 768)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
        read_embedding(str(broken))


def test_embedding_folder_and_served_names(sd1_folder, tmp_path, monkeypatch):
    from stable_diffusion.server import serve_request
    from stable_diffusion.text_to_image import SERVING_KEYS, TextToImage
    write_embedding(str(tmp_path / "glowing.safetensors"), "a1111_safetensors",
                    np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32))
    monkeypatch.setenv("STABLE_DIFFUSION_EMBEDDING_DIR", str(tmp_path))
    generator = TextToImage(sd1_folder)
    request = dict(width_height=[64, 64], num_inference_steps=2, display_rate=0, seed=1)
    served = serve_request(generator.generate_image, SERVING_KEYS, "a glowing lamp", **request)
    assert served[0].tags["embeddings"] == ["glowing"]
    plain = serve_request(generator.generate_image, SERVING_KEYS, "a lamp", **request)
    assert "embeddings" not in plain[0].tags  # known from the folder, but not used
    with pytest.raises(ValueError, match="not a plain file name"):
        serve_request(generator.generate_image, SERVING_KEYS, "a lamp", embeddings=[str(tmp_path / "glowing.safetensors")],
                      **request)
    with pytest.raises(ValueError, match="no embedding called 'dull'"):
        serve_request(generator.generate_image, SERVING_KEYS, "a lamp", embeddings=["dull"], **request)
