"""Token merging for Stable Diffusion (ToMe for SD, Bolya and Hoffman 2023), as the `tomesd` package
applies it with its defaults: before each self-attention at full latent size, `ratio` of the tokens are
merged into similar ones (bipartite soft matching: one "destination" token in every 2x2 cell, each other
token joined to its most similar destination, the most similar pairs first), attention runs on the
rest, and the merged tokens get their destination's output back. Cross-attention and the feed-forward
layer see every token (tomesd's merge_crossattn and merge_mlp are off by default).

Which token of each cell is the destination is random per UNet call in tomesd; here it comes from the
timestep (`merge_groups`), so an image does not depend on how many calls came before it. The groups are
computed outside the traced graph and given to it as inputs, as the timestep's features are.
"""
import numpy as np
import paddle

from stable_diffusion.models.layers import dims

STRIDE = 2  # tomesd's sx = sy: one destination token per 2x2 cell
MAX_RATIO = 1 - 1 / STRIDE ** 2  # every token but the destinations merged


def destination_choice(cells_y, cells_x, timestep):
    """Which token of each 2x2 cell is its destination (0 top left, 1 top right, 2, 3 the row below)."""
    return np.random.default_rng(int(round(float(timestep)))).integers(STRIDE * STRIDE, size=(cells_y, cells_x))


def merge_groups(height, width, timestep):
    """(destination, source) token indices, int64, for a height x width grid of tokens (raster order):
    one destination at a random place in each whole 2x2 cell, seeded by the timestep; every other token,
    the cells cut off at an odd edge's included, is a source."""
    cells_y, cells_x = height // STRIDE, width // STRIDE
    choice = destination_choice(cells_y, cells_x, timestep)
    y = np.arange(cells_y)[:, None] * STRIDE + choice // STRIDE
    x = np.arange(cells_x)[None, :] * STRIDE + choice % STRIDE
    destination = np.sort((y * width + x).ravel()).astype(np.int64)
    is_destination = np.zeros(height * width, bool)
    is_destination[destination] = True
    return destination, np.flatnonzero(~is_destination).astype(np.int64)


def rows(x, index):
    """x [B, L, C], index [B, K] -> [B, K, C], row index[b, k] of x[b]. One gather on the flattened
    rows: in the 512 px UNet graph Paddle's take_along_axis took 5.8 ms a call against gather's 0.6
    (bench/op_profile.py --token_merging 0.5); with this and rsqrt below, ToMe's step went from 0.95x
    to 0.87x of the plain one (bench/token_merging.py)."""
    batch, length, channels = dims(x)[0], dims(x)[1], x.shape[-1]
    offsets = paddle.arange(batch, dtype="int64").unsqueeze(1) * length
    return paddle.gather(x.reshape([-1, channels]), (index + offsets).flatten()).reshape([batch, -1, channels])


def bipartite_soft_matching(metric, destination, source, ratio):
    """metric [B, N, C]: the tokens compared (by cosine similarity); destination, source: merge_groups'.
    -> (merge, unmerge): merge [B, N, C'] -> [B, N - r, C'] with r = floor(N * ratio) (the unmerged
    sources, then the destinations, each the mean of itself and the sources merged into it); unmerge
    puts every token back in its place, a merged source taking its destination's value."""
    tokens = dims(metric)[1]
    merged = int(tokens * ratio) if paddle.in_dynamic_mode() else paddle.cast(
        paddle.floor(paddle.cast(tokens, "float64") * ratio), "int64")
    with paddle.no_grad():
        metric = metric * paddle.rsqrt((metric * metric).sum(axis=-1, keepdim=True))  # p_norm: 18 ms a call
        a, b = paddle.gather(metric, source, axis=1), paddle.gather(metric, destination, axis=1)
        scores = paddle.matmul(a, b, transpose_y=True)  # [B, sources, destinations]
        best, best_destination = scores.max(axis=-1), scores.argmax(axis=-1)
        order = paddle.argsort(best, axis=-1, descending=True)
        kept, joined = order[:, merged:], order[:, :merged]
        joined_destination = paddle.take_along_axis(best_destination, joined, axis=1)

    def merge(x):
        src, dst = paddle.gather(x, source, axis=1), paddle.gather(x, destination, axis=1)
        unmerged, moving = rows(src, kept), rows(src, joined)
        index = joined_destination.unsqueeze(-1).expand_as(moving)
        dst = paddle.put_along_axis(dst, index, moving, axis=1, reduce="mean", include_self=True, broadcast=False)
        return paddle.concat([unmerged, dst], axis=1)

    def unmerge(x):
        kept_count = dims(kept)[1]
        unmerged, dst = x[:, :kept_count], x[:, kept_count:]
        moved = rows(dst, joined_destination)
        pieces = paddle.concat([dst, unmerged, moved], axis=1)
        # Where each piece goes: one permutation of the N places, undone by its argsort.
        places = paddle.concat([destination.unsqueeze(0).expand([dims(x)[0], -1]),
                                paddle.gather(source, kept.flatten()).reshape(paddle.shape(kept)),
                                paddle.gather(source, joined.flatten()).reshape(paddle.shape(joined))], axis=1)
        return rows(pieces, paddle.argsort(places, axis=1))

    return merge, unmerge
