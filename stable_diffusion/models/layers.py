"""Building blocks shared by the UNet and the VAE.

Attribute names follow diffusers' modeling files, so a diffusers state dict maps onto these layers
key for key (Paddle's Linear stores its weight transposed; the loader handles that).
"""
import math

import numpy as np

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

# SiLU under its other name: Paddle Inference runs `swish` with oneDNN and `silu` with a slower native
# kernel (bench/ops.py, bench/NOTES.md section 10).
silu = F.swish


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm`, written differently in a traced graph (run by Paddle Inference with oneDNN).

    oneDNN has no group_norm, and Paddle's own kernel needs the plain layout: every convolution after
    it then reorders its input into oneDNN's blocked layout, into a buffer Paddle keeps per operator
    and image size (2 GB in the VAE decoder at 512 px). Here the statistics come from global average
    pooling, which oneDNN runs in the blocked layout, and the normalization is a per-channel scale and
    shift, which oneDNN fuses with the swish after it: the activations never leave the blocked layout,
    and the graph runs faster too (bench/NOTES.md section 22). The variance is E[x^2] - E[x]^2, and
    oneDNN's pooling sums a channel in one fp32 running sum: at 512 px the VAE decode is 4.6e-5 (of the
    largest value) from diffusers', against 5.8e-6 with Paddle's kernel (bench/accuracy.py)."""

    def forward(self, x):
        if paddle.in_dynamic_mode():
            return super().forward(x)
        groups, channels = self._num_groups, self._num_channels

        # Pooling again, not `mean`: Paddle's oneDNN check for `mean` prints a line per operator.
        def per_group(channel_means):
            return F.adaptive_avg_pool2d(channel_means.reshape([0, groups, channels // groups, 1]), 1)

        def per_channel(group_values):
            return group_values.expand([-1, -1, channels // groups, 1]).reshape([0, channels, 1, 1])

        mean = per_group(F.adaptive_avg_pool2d(x, 1))
        variance = F.relu(per_group(F.adaptive_avg_pool2d(x * x, 1)) - mean * mean)
        scale = per_channel(paddle.rsqrt(variance + self._epsilon)) * self.weight.reshape([1, channels, 1, 1])
        shift = self.bias.reshape([1, channels, 1, 1]) - per_channel(mean) * scale
        return x * scale + shift


class Attention(nn.Layer):
    """Multi-head attention as diffusers' `Attention`: self-attention, or cross-attention when
    `cross_attention_dim` is given. `upcast` computes the softmax in fp32 (SD 2.1 needs it in fp16).
    `kernel` and `query_chunks` are the CPU engine's, set before it traces (cpu/compiled.py)."""

    def __init__(self, query_dim, heads, dim_head, cross_attention_dim=None, bias=False, upcast=False):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.query_chunks = None
        self.kernel = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias_attr=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias_attr=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias_attr=bias)
        self.to_out = nn.LayerList([nn.Linear(inner_dim, query_dim)])

    def forward(self, hidden_states, context=None):
        context = hidden_states if context is None else context
        q, k, v = self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        return self.to_out[0](scaled_dot_product_attention(q, k, v, self.heads, self.upcast,
                                                           query_chunks=self.query_chunks, kernel=self.kernel))


def dims(x):
    """x's shape: Python ints when running eagerly, a shape tensor when traced for a static graph
    (whose batch and spatial sizes are unknown until run time)."""
    return x.shape if paddle.in_dynamic_mode() else paddle.shape(x)


def scaled_dot_product_attention(q, k, v, heads, upcast=False, mask=None, query_chunks=None, kernel=None):
    """q: [B, Lq, H*D], k and v: [B, Lk, H*D] -> [B, Lq, H*D]; mask ([B, 1, Lq, Lk]) is added to the
    scores. With `query_chunks` None (eager, GPU), all heads in one batched product.

    The CPU engine (cpu/compiled.py) sets the other two before it traces. `kernel(q, k, v, heads,
    scale)`: a fused operator that computes it all (fp32, no mask: cpu/attention.py). `query_chunks`
    (where there is no kernel): one head and one block of queries at a time. Paddle has no fused
    attention on CPU, and the whole [B, H, Lq, Lk] score tensor (1 GiB per layer for SD at 512 px)
    makes every pass over it run from main memory; a block's scores stay in cache (bench/NOTES.md
    section 8). The graph is traced once for every image size, so the number of blocks is fixed and
    their size follows Lq; the queries are padded to a multiple of `query_chunks` and the padded rows
    dropped at the end. A mask needs query_chunks 1 or None."""
    if mask is not None and query_chunks not in (None, 1):
        raise ValueError("a mask needs query_chunks=1")
    inner = q.shape[-1]
    dim_head = inner // heads
    if kernel is not None and mask is None and q.dtype == paddle.float32:
        return kernel(q, k, v, heads, dim_head ** -0.5)
    if upcast and q.dtype != paddle.float32:
        q, k = q.astype("float32"), k.astype("float32")
    # Scaling q rather than the scores: one pass over [B, Lq, H*D] instead of [B, H, Lq, Lk].
    q = q * (dim_head ** -0.5)
    if query_chunks is None:
        def split_heads(t):
            return t.reshape([0, 0, heads, dim_head]).transpose([0, 2, 1, 3])
        scores = paddle.matmul(split_heads(q), split_heads(k), transpose_y=True)
        if mask is not None:
            scores = scores + mask
        out = paddle.matmul(F.softmax(scores, axis=-1).astype(v.dtype), split_heads(v))
        return out.transpose([0, 2, 1, 3]).reshape([0, 0, inner])
    length = dims(q)[1]
    if query_chunks > 1:
        chunk = (length + query_chunks - 1) // query_chunks
        padding = paddle.zeros([dims(q)[0], chunk * query_chunks - length, inner], q.dtype)
        q = paddle.concat([q, padding], axis=1)
    q = q.reshape([0, query_chunks, -1, inner])
    outs = []
    for h in range(heads):
        channels = slice(h * dim_head, (h + 1) * dim_head)
        k_head, v_head = k[:, :, channels], v[:, :, channels]
        blocks = []
        for i in range(query_chunks):
            scores = paddle.matmul(q[:, i, :, channels], k_head, transpose_y=True)
            if mask is not None:
                scores = scores + mask[:, 0]
            blocks.append(paddle.matmul(F.softmax(scores, axis=-1).astype(v.dtype), v_head))
        outs.append(paddle.concat(blocks, axis=1) if query_chunks > 1 else blocks[0])
    out = paddle.concat(outs, axis=-1)
    return out[:, :length] if query_chunks > 1 else out


class ResnetBlock2D(nn.Layer):
    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-6):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, epsilon=eps)
        self.conv1 = nn.Conv2D(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, epsilon=eps)
        self.conv2 = nn.Conv2D(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2D(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(silu(temb))[:, :, None, None]
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Layer):
    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2D(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            # The VAE encoder pads right and bottom only, as in the original LDM code.
            x = F.pad(x, [0, 1, 0, 1])
        return self.conv(x)


class Upsample2D(nn.Layer):
    """Nearest-neighbour x2, then a 3x3 convolution; computed as one transposed convolution (stride 2,
    4x4 kernel) of the input.

    Through the 3x3 kernel, each output pixel sees only 2 distinct input rows and 2 columns: 2.25x
    fewer multiply-adds than convolving the upsampled input, which is never built (bench/NOTES.md sections 10, 14)."""

    # Along one axis, output 2i sees input i-1 through tap w0 and input i through w1 + w2; output 2i+1
    # sees input i through w0 + w1 and input i+1 through w2. A transposed convolution (stride 2,
    # padding 1) gives output 2i input i through k[1] and input i-1 through k[3], output 2i+1 input i
    # through k[2] and input i+1 through k[0]: k = [w2, w1 + w2, w0 + w1, w0], T @ w @ T^T per axis.
    TRANSPOSED_TAPS = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2D(channels, channels, 3, padding=1)
        self.held_kernels = None

    def kernels(self):
        """The transposed convolution's kernel [in, out, 4, 4], and the 3x3 kernel as a matrix
        [in * 9, out] (rows: input channel, then tap row, then tap column) for the recomputed edges."""
        if self.held_kernels is not None:
            return self.held_kernels[0], self.held_kernels[1]
        weight = self.conv.weight
        taps = paddle.to_tensor(self.TRANSPOSED_TAPS, dtype=weight.dtype)
        kernel = paddle.matmul(paddle.matmul(taps, weight), taps, transpose_y=True)  # [out, in, 4, 4]
        return kernel.transpose([1, 0, 2, 3]), weight.reshape([weight.shape[0], -1]).transpose([1, 0])

    def hold_kernels(self):
        """Hold both kernels as weights of their own, for a traced graph: Paddle Inference folds kernels
        computed from a weight into new weights that it owns, which the mapped weights file cannot
        lend (mapped_weights.py)."""
        held = nn.ParameterList()
        for kernel in self.kernels():
            parameter = self.create_parameter(kernel.shape, dtype=kernel.dtype)
            parameter.set_value(kernel)
            held.append(parameter)
        self.held_kernels = held

    def forward(self, x, size=None):
        """x upsampled to 2x its size, or to `size` (an odd side 2n-1 where the UNet's skip has one)."""
        kernel, edge_matrix = self.kernels()
        out = F.conv2d_transpose(x, kernel, self.conv.bias, stride=2, padding=1)
        if size is None:
            return out
        # Nearest interpolation to an odd side picks the same pixels as x2 and a crop, but the last
        # row (column) of the crop meets the kernel's zero padding where the transposed kernel assumed
        # a copy of the last input row: the last row and column are recomputed plainly, for either parity.
        last_row = self.last_row(x, size, edge_matrix, columns=False)
        last_column = self.last_row(x.transpose([0, 1, 3, 2]), [size[1], size[0]], edge_matrix, columns=True)
        out = paddle.concat([out[:, :, :size[0] - 1, :size[1] - 1],
                             last_column.transpose([0, 1, 3, 2])[:, :, :size[0] - 1]], axis=3)
        return paddle.concat([out, last_row], axis=2)

    def last_row(self, x, size, edge_matrix, columns):
        """Output row size[0] - 1, the plain way: the 3x3 kernel over the two upsampled rows it sees
        (upsampled rows size[0] - 2 and size[0] - 1, cropped to size[1] columns) and zero padding;
        `columns`: x and `size` are transposed, for the last column. A matmul with the kernel as a
        matrix, not a convolution: oneDNN keeps a reordered copy of each convolution's weights, and a
        matmul reads them where they are (0.25 GB in SD v1.5's UNet)."""
        odd = 2 * dims(x)[2] - size[0]  # 1 when the target height is odd, else 0
        odd = odd if isinstance(odd, int) else odd.astype(x.dtype)
        padded = F.pad(x, [0, 0, 1, 0])  # a zero row above: the row before the first, for 1-row inputs
        upper = odd * padded[:, :, -2:-1] + (1 - odd) * padded[:, :, -1:]
        rows = paddle.repeat_interleave(paddle.concat([upper, x[:, :, -1:]], axis=2), 2, axis=3)
        # The 3x3 windows centred on the lower row: a zero row below, a zero column either side.
        windows = F.unfold(F.pad(rows[:, :, :, :size[1]], [1, 1, 0, 1]), 3)  # [N, in * 9, size[1]]
        if columns:  # tap rows and columns swap back
            channels = self.conv.weight.shape[1]
            windows = windows.reshape([0, channels, 3, 3, -1]).transpose([0, 1, 3, 2, 4])
            windows = windows.reshape([0, channels * 9, -1])
        row = paddle.matmul(windows.transpose([0, 2, 1]), edge_matrix).transpose([0, 2, 1])
        return row.unsqueeze(2) + self.conv.bias.reshape([1, -1, 1, 1])


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal features of timesteps, [T] -> [T, dim], in float32 numpy. Computed on the host: it
    is tiny, and Paddle Inference mis-evaluates sin and cos of one input in the same graph."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    emb = np.asarray(timesteps, np.float32).reshape(-1, 1) * np.exp(exponent).astype(np.float32)[None, :]
    sin, cos = np.sin(emb), np.cos(emb)
    emb = np.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = np.pad(emb, [(0, 0), (0, 1)])
    return emb.astype(np.float32)
