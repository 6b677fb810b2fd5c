import pytest

from stable_diffusion.tokenizer import CLIPTokenizer

# Known ids of the CLIP ViT-L/14 vocabulary (padding aside).
KNOWN = {
    "A painting of a flooble": [49406, 320, 3086, 539, 320, 4062, 1059, 49407],
    "in the morning light,Overlooking TOKYO city by greg rutkowski and thomas kinkade,Trending on artstation.":
        [49406, 530, 518, 1119, 1395, 267, 17319, 6667, 1305, 638, 7943, 14973, 17649, 537, 3888, 1442,
         41130, 267, 6087, 525, 1486, 2631, 269, 49407],
}


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_folder()


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids_padded_with_end_token(tokenizer, text):
    ids = tokenizer(text)
    expected = KNOWN[text]
    assert len(ids) == 77
    assert ids[: len(expected)] == expected
    assert set(ids[len(expected):]) == {49407}


def test_cleanup_lowercase_and_whitespace(tokenizer):
    assert tokenizer("  A   Painting\nof &amp; a\tflooble ") == tokenizer("a painting of & a flooble")


def test_long_prompt_truncated_to_77_with_end_token(tokenizer):
    ids = tokenizer("cat " * 200)
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


@pytest.mark.parametrize("text", ["a photo of an astronaut riding a horse on mars", "Ünïcödé 123 ¿qué? 東京 don't",
                                  "emoji 🚀🔥 and punctuation!!! ...", ""])
def test_matches_transformers_tokenizer(tokenizer, text):
    from transformers import CLIPTokenizer as Reference
    from stable_diffusion.tokenizer import BUNDLED_VOCAB_DIR
    reference = Reference(f"{BUNDLED_VOCAB_DIR}/vocab.json", f"{BUNDLED_VOCAB_DIR}/merges.txt")
    expected = reference(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer(text) == expected
