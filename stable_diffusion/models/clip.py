"""CLIP text encoder (transformers' CLIPTextModel), built from `text_encoder/config.json`.

Parameter names are transformers' without the `text_model.` prefix, which the loader strips.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from stable_diffusion.models.layers import scaled_dot_product_attention

CLIP_DEFAULTS = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * F.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


class CLIPAttention(nn.Layer):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query_chunks = None  # the CPU engine's, set before it traces (cpu/compiled.py)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(scaled_dot_product_attention(q, k, v, self.heads, mask=mask,
                                                         query_chunks=self.query_chunks))


class CLIPEncoderLayer(nn.Layer):
    def __init__(self, cfg):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.self_attn = CLIPAttention(dim, cfg["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(dim, epsilon=eps)
        self.mlp = nn.Layer()
        self.mlp.fc1 = nn.Linear(dim, cfg["intermediate_size"])
        self.mlp.fc2 = nn.Linear(cfg["intermediate_size"], dim)
        self.layer_norm2 = nn.LayerNorm(dim, epsilon=eps)
        self.activation = ACTIVATIONS[cfg["hidden_act"]]

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(self.activation(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Layer):
    def __init__(self, config):
        super().__init__()
        cfg = {**CLIP_DEFAULTS, **config}
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act {cfg['hidden_act']!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        self.config = cfg
        dim = cfg["hidden_size"]
        self.embeddings = nn.Layer()
        self.embeddings.token_embedding = nn.Embedding(cfg["vocab_size"], dim)
        self.embeddings.position_embedding = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.encoder = nn.Layer()
        self.encoder.layers = nn.LayerList([CLIPEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.final_layer_norm = nn.LayerNorm(dim, epsilon=cfg["layer_norm_eps"])

    def embed_tokens(self, input_ids):
        """int64 [B, L] -> token embeddings [B, L, hidden_size], before the position embeddings: where
        textual-inversion vectors replace a token's (pipeline.encode_text)."""
        return self.embeddings.token_embedding(input_ids)

    def layer_outputs(self, token_embeds):
        """Token embeddings [B, L, D] -> every layer's output after the final norm, [layers, B, L, D]:
        clip_skip k takes the k-th from the end (1: the last layer, transformers' last_hidden_state)."""
        return normed_layer_outputs(token_embeds, self.embeddings.position_embedding, self.encoder.layers,
                                    self.final_layer_norm)

    def forward(self, input_ids, clip_skip=1):
        """input_ids: int64 [B, L] -> the hidden state [B, L, hidden_size] of the clip_skip-th layer from
        the end, after the final norm (clip_skip 1: transformers' last_hidden_state)."""
        return self.layer_outputs(self.embed_tokens(input_ids))[-clip_skip]


def normed_layer_outputs(token_embeds, position_embedding, layers, final_layer_norm):
    length = token_embeds.shape[1]
    x = token_embeds + position_embedding.weight[:length].unsqueeze(0)
    causal = paddle.triu(paddle.full([length, length], float("-inf"), dtype=x.dtype), diagonal=1)
    mask = causal[None, None]
    outputs = []
    for layer in layers:
        x = layer(x, mask)
        outputs.append(final_layer_norm(x))
    return paddle.stack(outputs)
