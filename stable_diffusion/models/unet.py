"""UNet2DConditionModel: the denoiser of Stable Diffusion 1.x and 2.x, as in diffusers.

Built from a diffusers `unet/config.json`; only the block types Stable Diffusion uses are supported.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from stable_diffusion.models.layers import (Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, dims,
                                            silu, timestep_embedding)
from stable_diffusion.models.token_merging import bipartite_soft_matching, merge_groups

UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    num_attention_heads=None, use_linear_projection=False, upcast_attention=False,
)
SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}


class FeedForward(nn.Layer):
    """GEGLU feed-forward; `net` mirrors diffusers' [GEGLU, Dropout, Linear] list."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.inner = inner = dim * mult
        geglu = nn.Layer()
        geglu.proj = nn.Linear(dim, inner * 2)
        self.net = nn.LayerList([geglu, nn.Identity(), nn.Linear(inner, dim)])
        self.halves = None

    def forward(self, x):
        hidden, gate = self.project(x)
        return self.net[2](hidden * F.gelu(gate))

    def project(self, x):
        # Two products with the halves of the weight, not one product split in two: the split copies
        # the whole [B, L, 2 * inner] output (bench/NOTES.md sections 17, 23).
        if self.halves is not None:
            return self.halves[0](x), self.halves[1](x)
        weight, bias, inner = self.net[0].proj.weight, self.net[0].proj.bias, self.inner
        return F.linear(x, weight[:, :inner], bias[:inner]), F.linear(x, weight[:, inner:], bias[inner:])

    def split_projection(self):
        """Hold the projection's halves as weights of their own, for a traced graph: Paddle Inference
        folds a sliced weight into a new weight that it owns, which the mapped weights file cannot
        lend (mapped_weights.py)."""
        proj, inner = self.net[0].proj, self.inner
        halves = nn.LayerList([nn.Linear(proj.weight.shape[0], inner) for _ in range(2)])
        for half, columns in zip(halves, (slice(0, inner), slice(inner, None))):
            half.weight.set_value(proj.weight[:, columns])
            half.bias.set_value(proj.bias[columns])
        self.halves = halves


class BasicTransformerBlock(nn.Layer):
    def __init__(self, dim, heads, dim_head, cross_attention_dim, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, merging=None):
        """merging: (destination, source, ratio) to merge tokens for the self-attention (token_merging.py)."""
        if merging is None:
            x = x + self.attn1(self.norm1(x))
        else:
            merge, unmerge = bipartite_soft_matching(x, *merging)
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Layer):
    def __init__(self, channels, heads, cross_attention_dim, groups, linear_projection, upcast):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, epsilon=1e-6)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2D(channels, channels, 1), nn.Conv2D(channels, channels, 1)
        self.transformer_blocks = nn.LayerList(
            [BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim, upcast)])

    def forward(self, x, context, merging=None):
        shape, channels = dims(x), x.shape[1]
        residual = x
        h = self.norm(x)
        to_tokens = lambda t: t.transpose([0, 2, 3, 1]).reshape([0, -1, channels])
        to_image = lambda t: t.reshape([shape[0], shape[2], shape[3], channels]).transpose([0, 3, 1, 2])
        if self.linear_projection:
            h = self.proj_in(to_tokens(h))
        else:
            h = to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context, merging)
        if self.linear_projection:
            h = to_image(self.proj_out(h))
        else:
            h = self.proj_out(to_image(h))
        return h + residual


class UNetBlock(nn.Layer):
    """A down or up block: resnets, optional cross-attention after each, optional resampler."""

    def __init__(self, resnets, attentions, downsampler=None, upsampler=None):
        super().__init__()
        self.resnets = nn.LayerList(resnets)
        if attentions:
            self.attentions = nn.LayerList(attentions)
        else:
            self.attentions = None
        if downsampler is not None:
            self.downsamplers = nn.LayerList([downsampler])
        else:
            self.downsamplers = None
        if upsampler is not None:
            self.upsamplers = nn.LayerList([upsampler])
        else:
            self.upsamplers = None


class UNetMidBlock(nn.Layer):
    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.LayerList(resnets)
        self.attentions = nn.LayerList(attentions)

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


def _per_block(value, count):
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class UNet2DConditionModel(nn.Layer):
    def __init__(self, config):
        super().__init__()
        cfg = {**UNET_DEFAULTS, **config}
        unsupported = [t for t in cfg["down_block_types"] if t not in SUPPORTED_DOWN]
        unsupported += [t for t in cfg["up_block_types"] if t not in SUPPORTED_UP]
        if unsupported:
            raise ValueError(f"UNet block types {unsupported} are not supported; "
                             f"Stable Diffusion uses {sorted(SUPPORTED_DOWN | SUPPORTED_UP)}")
        for key in ("transformer_layers_per_block",):
            if any(n != 1 for n in _per_block(cfg.get(key, 1), 1)):
                raise ValueError(f"UNet config {key}={cfg[key]} is not supported (only 1)")
        self.config = cfg
        channels = cfg["block_out_channels"]
        blocks = len(channels)
        # diffusers reads `attention_head_dim` as the number of heads when num_attention_heads is unset.
        heads = _per_block(cfg["num_attention_heads"] or cfg["attention_head_dim"], blocks)
        cross_dim = cfg["cross_attention_dim"]
        groups, eps, layers = cfg["norm_num_groups"], cfg["norm_eps"], cfg["layers_per_block"]
        temb_dim = channels[0] * 4

        def resnet(cin, cout):
            return ResnetBlock2D(cin, cout, temb_dim, groups, eps)

        def attention(ch, n_heads):
            return Transformer2DModel(ch, n_heads, cross_dim, groups, cfg["use_linear_projection"],
                                      cfg["upcast_attention"])

        self.conv_in = nn.Conv2D(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = nn.Layer()
        self.time_embedding.linear_1 = nn.Linear(channels[0], temb_dim)
        self.time_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)

        down_blocks, out_ch = [], channels[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            in_ch, out_ch = out_ch, channels[i]
            is_last = i == blocks - 1
            down_blocks.append(UNetBlock(
                [resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(layers)],
                [attention(out_ch, heads[i]) for _ in range(layers)] if block_type.startswith("CrossAttn") else [],
                downsampler=None if is_last else Downsample2D(out_ch, cfg["downsample_padding"])))
        self.down_blocks = nn.LayerList(down_blocks)

        self.mid_block = UNetMidBlock([resnet(channels[-1], channels[-1]) for _ in range(2)],
                                      [attention(channels[-1], heads[-1])])

        up_blocks, reversed_channels, reversed_heads = [], channels[::-1], heads[::-1]
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(cfg["up_block_types"]):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            skip_ch = reversed_channels[min(i + 1, blocks - 1)]
            is_last = i == blocks - 1
            up_blocks.append(UNetBlock(
                [resnet((prev_ch if j == 0 else out_ch) + (skip_ch if j == layers else out_ch), out_ch)
                 for j in range(layers + 1)],
                [attention(out_ch, reversed_heads[i]) for _ in range(layers + 1)]
                if block_type.startswith("CrossAttn") else [],
                upsampler=None if is_last else Upsample2D(out_ch)))
        self.up_blocks = nn.LayerList(up_blocks)

        self.conv_norm_out = GroupNorm(groups, channels[0], epsilon=eps)
        self.conv_out = nn.Conv2D(channels[0], cfg["out_channels"], 3, padding=1)
        # ToMe's ratio at full latent size (0: off; token_merging.py), set before a CPU graph is traced.
        self.token_merging = 0.0

    def merge_inputs(self, sample_shape, timestep):
        """[destination, source] token indices for this call with token merging on, else []."""
        if not self.token_merging:
            return []
        return list(merge_groups(sample_shape[-2], sample_shape[-1], timestep))

    def merging(self, destination, source):
        return None if destination is None else (destination, source, self.token_merging)

    def time_features(self, timestep):
        """A number or a [1] / [B] array of timesteps -> the sinusoidal features the UNet embeds."""
        if isinstance(timestep, paddle.Tensor):
            timestep = timestep.numpy()
        return timestep_embedding(timestep, self.config["block_out_channels"][0], self.config["flip_sin_to_cos"],
                                  self.config["freq_shift"])

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample: [B, C, H, W]; timestep: a number, or 1 or B of them; encoder_hidden_states: [B, 77, D]."""
        return self.forward_keeping_deep_features(sample, paddle.to_tensor(self.time_features(timestep)),
                                                  encoder_hidden_states, *self.merge_tensors(sample, timestep))[0]

    def merge_tensors(self, sample, timestep):
        return [paddle.to_tensor(g) for g in self.merge_inputs(sample.shape, timestep)]

    def forward_keeping_deep_features(self, sample, time_features, encoder_hidden_states, destination=None,
                                      source=None):
        """-> (output, the deep features DeepCache reuses on its shallow steps: what the last up block's
        last resnet takes beside the conv_in skip). destination, source: merge_inputs' (token merging)."""
        merging = self.merging(destination, source)
        temb = time_features.astype(sample.dtype)
        temb = self.time_embedding.linear_2(silu(self.time_embedding.linear_1(temb)))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for level, block in enumerate(self.down_blocks):
            for j, resnet in enumerate(block.resnets):
                x = resnet(x, temb)
                if block.attentions is not None:
                    x = block.attentions[j](x, context, merging if level == 0 else None)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block(x, temb, context)

        deep = None
        for i, block in enumerate(self.up_blocks):
            level = len(self.up_blocks) - 1 - i
            for j, resnet in enumerate(block.resnets):
                if len(skips) == 1:  # the last resnet of the last block, which meets conv_in's output
                    deep = x
                x = resnet(paddle.concat([x, skips.pop()], axis=1), temb)
                if block.attentions is not None:
                    x = block.attentions[j](x, context, merging if level == 0 else None)
            if block.upsamplers is not None:
                # Upsample to the size of the skip it meets next: latents whose side is not a
                # multiple of 8 lose a pixel on the way down.
                x = block.upsamplers[0](x, size=dims(skips[-1])[2:])

        return self.conv_out(silu(self.conv_norm_out(x))), deep


class ShallowBranch(nn.Layer):
    """DeepCache's shallow step (Ma et al. 2023, branch 0, as the DeepCache package's
    DeepCacheSDHelper runs it): conv_in, then the last up block's last resnet (fed the deep features
    kept from the last full step beside conv_in's output) and its cross-attention, then the output
    layers. Holds the UNet's own layers; built on demand, never a sublayer of the UNet (its
    parameter names would repeat)."""

    def __init__(self, unet):
        super().__init__()
        last = unet.up_blocks[-1]
        self.conv_in, self.time_embedding = unet.conv_in, unet.time_embedding
        self.resnet = last.resnets[-1]
        self.attention = last.attentions[-1] if last.attentions is not None else None
        self.conv_norm_out, self.conv_out = unet.conv_norm_out, unet.conv_out
        self.merging = unet.merging

    def forward(self, sample, time_features, encoder_hidden_states, deep_features, destination=None, source=None):
        temb = time_features.astype(sample.dtype)
        temb = self.time_embedding.linear_2(silu(self.time_embedding.linear_1(temb)))
        x = self.resnet(paddle.concat([deep_features, self.conv_in(sample)], axis=1), temb)
        if self.attention is not None:
            x = self.attention(x, encoder_hidden_states, self.merging(destination, source))
        return self.conv_out(silu(self.conv_norm_out(x)))
