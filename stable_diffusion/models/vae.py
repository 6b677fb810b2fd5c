"""AutoencoderKL (the KL-f8 VAE of Stable Diffusion), as in diffusers, built from `vae/config.json`."""
import paddle
import paddle.nn as nn

from stable_diffusion.models.layers import (Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, dims,
                                            scaled_dot_product_attention, silu)

VAE_DEFAULTS = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


class VAEAttention(nn.Layer):
    """Single-head self-attention over pixels, with its own GroupNorm and residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, epsilon=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.LayerList([nn.Linear(channels, channels)])
        self.query_chunks = None  # the CPU engine's, set before it traces (cpu/compiled.py)
        self.kernel = None

    def forward(self, x):
        shape, channels = dims(x), x.shape[1]
        h = self.group_norm(x).flatten(2).transpose([0, 2, 1])
        h = scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, upcast=True,
                                         query_chunks=self.query_chunks, kernel=self.kernel)
        h = self.to_out[0](h).transpose([0, 2, 1]).reshape([shape[0], channels, shape[2], shape[3]])
        return x + h


class VAEMidBlock(nn.Layer):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.LayerList([ResnetBlock2D(channels, channels, None, groups) for _ in range(2)])
        self.attentions = nn.LayerList([VAEAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEBlock(nn.Layer):
    def __init__(self, resnets, downsampler=None, upsampler=None):
        super().__init__()
        self.resnets = nn.LayerList(resnets)
        self.downsamplers = nn.LayerList([downsampler]) if downsampler is not None else None
        self.upsamplers = nn.LayerList([upsampler]) if upsampler is not None else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Layer):
    def __init__(self, cfg):
        super().__init__()
        channels, groups, layers = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = nn.Conv2D(cfg["in_channels"], channels[0], 3, padding=1)
        blocks, out_ch = [], channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            blocks.append(VAEBlock(
                [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups) for j in range(layers)],
                downsampler=Downsample2D(out_ch, padding=0) if i < len(channels) - 1 else None))
        self.down_blocks = nn.LayerList(blocks)
        self.mid_block = VAEMidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], epsilon=1e-6)
        self.conv_out = nn.Conv2D(channels[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Layer):
    def __init__(self, cfg):
        super().__init__()
        channels, groups, layers = cfg["block_out_channels"][::-1], cfg["norm_num_groups"], cfg["layers_per_block"]
        self.conv_in = nn.Conv2D(cfg["latent_channels"], channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], groups)
        blocks, out_ch = [], channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            blocks.append(VAEBlock(
                [ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups) for j in range(layers + 1)],
                upsampler=Upsample2D(out_ch) if i < len(channels) - 1 else None))
        self.up_blocks = nn.LayerList(blocks)
        self.conv_norm_out = GroupNorm(groups, channels[-1], epsilon=1e-6)
        self.conv_out = nn.Conv2D(channels[-1], cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Layer):
    def __init__(self, config):
        super().__init__()
        cfg = {**VAE_DEFAULTS, **config}
        kinds = set(cfg["down_block_types"]) | set(cfg["up_block_types"])
        if not kinds <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ValueError(f"VAE block types {sorted(kinds)} are not supported")
        self.config = cfg
        latent = cfg["latent_channels"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2D(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2D(latent, latent, 1)

    @property
    def scaling_factor(self):
        return self.config["scaling_factor"]

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, images):
        """images in [-1, 1], [B, 3, H, W] -> (mean, logvar) of the latent distribution, unscaled."""
        return self.split_moments(self.quant_conv(self.encoder(images)))

    @staticmethod
    def split_moments(moments):
        mean, logvar = moments.chunk(2, axis=1)
        return mean, paddle.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))
