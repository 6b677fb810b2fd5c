"""The text encoder, UNet and VAE decoder as Paddle Inference predictors with oneDNN, for the CPU.

Eager Paddle runs convolutions about 4x slower than PyTorch on CPU; the same layers traced to a static
graph and run by Paddle Inference with oneDNN kernels are on par (bench/NOTES.md section 3). Tracing and saving
take a while, so the exported graph is cached per weights, keyed by where they came from and when
they were written.
"""
import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import paddle
import paddle.nn as nn
from paddle import inference
from paddle.static import InputSpec

from stable_diffusion.cpu.attention import attention_kernel
from stable_diffusion.cpu.mapped_weights import MappedWeights, align_tensor_data, release_freed_heap
from stable_diffusion.models.clip import normed_layer_outputs
from stable_diffusion.models.layers import Attention, Upsample2D
from stable_diffusion.models.unet import FeedForward, ShallowBranch
from stable_diffusion.models.vae import VAEAttention

CACHE_ENV_VAR = "STABLE_DIFFUSION_CACHE"
PARAMETER_NAMES_FILE = "parameter_names.json"
# The graphs are traced and saved by this code (every file of cpu/ and models/): a change to it must
# not reuse graphs saved by older code.
PACKAGE = os.path.dirname(os.path.dirname(__file__))
TRACED_SOURCES = sorted(os.path.join(root, name) for part in ("cpu", "models")
                        for root, _, names in os.walk(os.path.join(PACKAGE, part))
                        for name in names if name.endswith((".py", ".cc")))


# oneDNN keeps a reordered copy of every weight per input shape and per calling thread (as large as
# the UNet itself, 3.4 GB for SD v1.5), for as long as the predictor lives. So each predictor runs on a
# thread of its own, whichever thread asks (hub serving answers each request on a new one), and the
# UNet's and VAE decoder's predictors are replaced by new ones (empty caches, the same lent weights)
# when the image size changes (a clone would copy the lent weights). Paddle's own bound,
# `set_mkldnn_cache_capacity`, is shared by all predictors and evicts the newest shape first: the UNet
# and VAE decoder evicted each other's copies on every step after a size change (bench/NOTES.md section 16).


def cache_root():
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "stable_diffusion_paddle")


def weights_fingerprint(source, adapters=()):
    """Changes when the weights at `source` (a folder or a file) change, or what is merged into them
    (`adapters`: files and settings, e.g. a LoRA and its weight, or a VAE of its own)."""
    source = os.path.abspath(source)
    paths = files_under(source) + [path for adapter in adapters if os.path.exists(adapter)
                                   for path in files_under(adapter)]
    fused = attention_kernel(cache_root()) is not None
    digest = hashlib.sha256(f"{paddle.__version__} {source} fused attention: {fused} adapters: {list(adapters)}"
                            .encode())
    for path in TRACED_SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def files_under(path):
    """A file, or every file in a folder, by name."""
    return [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def hold_derived_weights(graph):
    """Before tracing: weights the graph would slice or compute from other weights become weights of
    their own, so that the mapped weights file lends them (Paddle Inference folds such constants into
    new weights of its own)."""
    for layer in graph.sublayers():
        if isinstance(layer, FeedForward):
            layer.split_projection()
        elif isinstance(layer, Upsample2D):
            layer.hold_kernels()


# Self-attention in blocks of queries where the attention operator could not be built, so that a
# block's scores stay in cache: by UNet level, 16 at full latent size (256 queries each at 512 px), 2 a
# level down (bench/NOTES.md sections 8, 25: 8 and 32 blocks measured within this machine's noise of
# 16); 8 in the VAE's attention, at latent size too. Every other attention: one head at a time.
UNET_SELF_ATTENTION_CHUNKS = {0: 16, 1: 2}
VAE_ATTENTION_CHUNKS = 8


def unet_level(name, levels):
    """The resolution level (0: full latent size) of the UNet sublayer called `name`."""
    part, index = name.split(".")[:2]
    if part == "down_blocks":
        return int(index)
    if part == "up_blocks":
        return levels - 1 - int(index)
    return levels - 1  # mid_block


def use_attention_kernel(graph):
    """Before tracing: attention as one operator, where it could be built (cpu/attention.py), else in
    blocks of queries."""
    kernel = attention_kernel(cache_root())
    unet = getattr(graph, "unet", None)
    levels = len(unet.config["block_out_channels"]) if unet is not None else 0
    for name, layer in graph.named_sublayers(include_self=True):
        if isinstance(layer, VAEAttention):
            layer.query_chunks = VAE_ATTENTION_CHUNKS
        elif unet is not None and name.endswith(".attn1"):
            layer.query_chunks = UNET_SELF_ATTENTION_CHUNKS.get(unet_level(name[len("unet."):], levels), 1)
        elif hasattr(layer, "query_chunks"):
            layer.query_chunks = 1
        if isinstance(layer, (Attention, VAEAttention)):
            layer.kernel = kernel


class TextEncoderGraph(nn.Layer):
    """The text encoder after its token lookup, which stays eager (textual-inversion vectors replace
    token embeddings there): every layer's normed output, for clip_skip to choose from."""

    def __init__(self, text_encoder):
        super().__init__()
        self.position_embedding = text_encoder.embeddings.position_embedding
        self.layers = text_encoder.encoder.layers
        self.final_layer_norm = text_encoder.final_layer_norm

    def forward(self, token_embeds):
        return normed_layer_outputs(token_embeds, self.position_embedding, self.layers, self.final_layer_norm)


class UNetGraph(nn.Layer):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, time_features, context, merge_destination=None, merge_source=None):
        return self.unet.forward_keeping_deep_features(sample, time_features, context, merge_destination,
                                                       merge_source)


class VAEEncoderGraph(nn.Layer):
    """The encoding half of the VAE: images in [-1, 1] -> the latent distribution's moments."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, images):
        return self.quant_conv(self.encoder(images))


class VAEDecoderGraph(nn.Layer):
    """The decoding half of the VAE only."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents):
        return self.decoder(self.post_quant_conv(latents))


def export(graph, input_spec, folder):
    """Trace and save into `folder`, through a temporary folder renamed at the end."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        hold_derived_weights(graph)
        use_attention_kernel(graph)
        static = paddle.jit.to_static(graph, input_spec=input_spec, full_graph=True)
        paddle.jit.save(static, os.path.join(scratch, "model"))
        with open(os.path.join(scratch, PARAMETER_NAMES_FILE), "w") as f:  # the graph's names for our weights
            json.dump({name: param.name for name, param in graph.named_parameters()}, f)
        if os.path.isfile(os.path.join(scratch, "model.pdiparams")):  # a graph without weights has none
            align_tensor_data(os.path.join(scratch, "model.pdiparams"))
        try:
            os.replace(scratch, folder)
        except OSError:
            if not os.path.isdir(folder):  # else another process exported the same graph first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def release_parameters(layer):
    """Free a layer's weights once its graph holds its own copy: peak memory stays one model's."""
    for param in layer.parameters():
        if param._is_initialized():
            param._clear_data()


def graph_folder(source, adapters=()):
    return os.path.join(cache_root(), weights_fingerprint(source, adapters))


def unet_graph_names(token_merging=0.0):
    """The UNet's graph and its shallow branch's: with token merging, graphs of their own per ratio."""
    suffix = f"_token_merging_{token_merging:g}" if token_merging else ""
    return f"unet{suffix}", f"unet_shallow{suffix}"


def unet_graph_cached(source, adapters=(), token_merging=0.0):
    """Whether the UNet's graphs for these weights (and what is merged into them) are saved: then its
    eager weights need not be loaded."""
    return all(os.path.isdir(os.path.join(graph_folder(source, adapters), name))
               for name in unet_graph_names(token_merging))


class CompiledLayer:
    """A saved graph run by a Paddle Inference predictor with oneDNN. `shapes_kept`: when inputs come
    in more shapes than that, run a new predictor, so that oneDNN's caches hold the latest shapes only
    (see above). The text encoder keeps two (a guided prompt of one chunk and an unguided one); so does
    the UNet: with guidance cut off, a guided step's batch of 2 and an unguided step's batch of 1
    alternate within every image, and a new predictor at each change made the demo model's images
    1.6x slower instead of faster (bench/demo_quality.py --guidance_cutoff 0.4: 3.6 s against 2.2 s).
    A second shape costs a second oneDNN copy of the convolution weights only when it is used."""

    def __init__(self, graph, input_spec, folder, threads, shapes_kept=1):
        if not os.path.isdir(folder):
            export(graph, input_spec, folder)
        release_parameters(graph)
        program = next(os.path.join(folder, n) for n in ("model.json", "model.pdmodel")
                       if os.path.isfile(os.path.join(folder, n)))
        self.program, self.threads = program, threads
        self.weights = MappedWeights(folder, program)
        names_path = os.path.join(folder, PARAMETER_NAMES_FILE)
        # {the traced layer's parameter name: the graph's}, for weights lent with other values
        self.parameter_names = {}
        if os.path.isfile(names_path):
            with open(names_path) as f:
                self.parameter_names = json.load(f)
        self.overrides = {}
        self.predictor = self.new_predictor()
        # By the InputSpec names: the predictor does not list its inputs in argument order.
        self.input_names = [spec.name for spec in input_spec]
        self.shapes_kept = shapes_kept
        self.shapes_seen = []
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="paddle-inference")

    def new_predictor(self):
        """A predictor with an empty oneDNN cache, its weights lent from the mapped file."""
        config = inference.Config(self.program, os.path.join(os.path.dirname(self.program), "model.pdiparams"))
        config.disable_gpu()
        config.enable_mkldnn()
        config.set_cpu_math_library_num_threads(self.threads)
        config.disable_glog_info()
        # Linear layers stay matmuls (their bias a separate add) rather than oneDNN's fc, which keeps a
        # reordered copy of its weights (0.8 GB for SD v1.5's UNet); a matmul reads them in the mapped
        # file (bench/NOTES.md 27).
        config.delete_pass("matmul_add_act_fuse_pass")
        predictor = inference.create_predictor(config)
        self.weights.lend_to(predictor, self.overrides)
        predictor.register_output_hook(self.weights.drop_pages_while_reading)
        return predictor

    def lendable_names(self, names):
        """The graph's names for these parameters of the traced layer, or None where one cannot be lent
        another value (a weight the graph computes from others, or folds)."""
        lendable = set(self.weights.lendable(self.predictor))
        graph_names = [self.parameter_names.get(name) for name in names]
        return graph_names if all(n in lendable for n in graph_names) else None

    def lend_weights(self, overrides):
        """Run with other values for some weights, {graph name: float32 array}, from the next call on:
        a new predictor (its oneDNN copies made from them); {} goes back to the file's own."""
        def replace():  # on the predictor's own thread, after any run in progress
            self.overrides = {name: np.ascontiguousarray(array, np.float32) for name, array in overrides.items()}
            self.predictor = None
            self.predictor = self.new_predictor()
            self.shapes_seen = []
        self.thread.submit(replace).result()

    def base_weight(self, graph_name):
        """A weight's value in the graph's own file."""
        return self.weights.arrays[graph_name]

    def __call__(self, *arrays):
        arrays = [np.ascontiguousarray(a.numpy() if isinstance(a, paddle.Tensor) else a) for a in arrays]
        arrays = [a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a for a in arrays]
        outputs = self.thread.submit(self.run, arrays).result()
        return [paddle.to_tensor(o) for o in outputs] if isinstance(outputs, list) else paddle.to_tensor(outputs)

    def run(self, arrays):
        shapes = [array.shape for array in arrays]
        new_shape = shapes not in self.shapes_seen
        if new_shape:
            if len(self.shapes_seen) >= self.shapes_kept:
                # Not a clone: a clone copies the lent weights. The old predictor goes first.
                self.predictor = None
                self.predictor = self.new_predictor()
                self.shapes_seen = []
            self.shapes_seen.append(shapes)
        for name, array in zip(self.input_names, arrays):
            self.predictor.get_input_handle(name).copy_from_cpu(array)
        try:
            self.predictor.run()
        finally:
            # Matmuls read their weights from the mapping on every run: their pages should not stay
            # resident while another graph runs.
            self.weights.drop_pages()
            release_freed_heap()
        outputs = [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.predictor.get_output_names()]
        return outputs[0] if len(outputs) == 1 else outputs


def compile_for_cpu(models, threads):
    """(text_encoder, unet, vae_encode, vae_decode) callables backed by Paddle Inference; exported on
    first use per weights. The eager models give their weights up to the graphs: only their configs
    (and the text encoder's token embeddings) remain. `text_encoder(token_embeds)` returns every
    layer's normed output, as CLIPTextModel.layer_outputs; `vae_encode(images)` returns (mean, logvar),
    as the eager VAE's `encode`."""

    def folder(graph_name):
        component = next((c for c in ("vae", "unet") if graph_name.startswith(c)), graph_name)
        return os.path.join(graph_folder(models.source, models.adapters.get(component, ())), graph_name)

    width = models.text_encoder.config["hidden_size"]
    text_encoder = CompiledLayer(TextEncoderGraph(models.text_encoder),
                                 [InputSpec([None, None, width], "float32", "token_embeds")],
                                 folder("text_encoder"), threads, shapes_kept=2)
    cross_dim = models.unet.config["cross_attention_dim"]
    channels = models.unet.config["in_channels"]
    time_dim = models.unet.config["block_out_channels"][0]
    unet_inputs = [InputSpec([None, channels, None, None], "float32", "sample"),
                   InputSpec([None, time_dim], "float32", "time_features"),
                   InputSpec([None, None, cross_dim], "float32", "context")]
    shallow_inputs = unet_inputs + [InputSpec([None, time_dim, None, None], "float32", "deep_features")]
    if models.unet.token_merging:  # the token groups of each call (models/token_merging.py)
        merge_inputs = [InputSpec([None], "int64", "merge_destination"), InputSpec([None], "int64", "merge_source")]
        unet_inputs, shallow_inputs = unet_inputs + merge_inputs, shallow_inputs + merge_inputs
    unet_name, shallow_name = unet_graph_names(models.unet.token_merging)
    if not os.path.isdir(folder(shallow_name)):  # before the UNet's graph takes the weights it shares
        export(ShallowBranch(models.unet), shallow_inputs, folder(shallow_name))
    graph = CompiledLayer(UNetGraph(models.unet), unet_inputs, folder(unet_name), threads, shapes_kept=2)
    shallow = CompiledLayer(ShallowBranch(models.unet), shallow_inputs, folder(shallow_name), threads, shapes_kept=2)

    def unet(sample, timestep, context):
        return unet_keeping_deep_features(sample, timestep, context)[0]

    def unet_keeping_deep_features(sample, timestep, context):
        return graph(sample, models.unet.time_features(timestep), context,
                     *models.unet.merge_inputs(sample.shape, timestep))

    def unet_shallow(sample, timestep, context, deep_features):
        return shallow(sample, models.unet.time_features(timestep), context, deep_features,
                       *models.unet.merge_inputs(sample.shape, timestep))

    unet.graph, unet.shallow_graph = graph, shallow
    unet.keeping_deep_features, unet.shallow = unet_keeping_deep_features, unet_shallow

    vae = models.vae
    moments = CompiledLayer(VAEEncoderGraph(vae), [InputSpec([None, vae.config["in_channels"], None, None], "float32",
                                                             "images")],
                            folder("vae_encoder"), threads)

    def vae_encode(images):
        return vae.split_moments(moments(images))

    vae_encode.graph = moments
    decode = CompiledLayer(VAEDecoderGraph(vae), [InputSpec([None, vae.config["latent_channels"], None, None],
                                                            "float32", "latents")],
                           folder("vae_decoder"), threads)
    release_parameters(vae)
    return text_encoder, unet, vae_encode, decode
