"""The compiled graphs' weights: saved aligned, mapped from the file and lent to the predictors."""
import os

import numpy as np
import paddle

from stable_diffusion.cpu.compiled import compile_for_cpu
from stable_diffusion.cpu.mapped_weights import ALIGNMENT, align_tensor_data, records
from stable_diffusion.loading import load_models


def data_offsets(path):
    with open(path, "rb") as f:
        return [offset for _, _, offset, _, _, _ in records(f, os.path.getsize(path))]


def test_saved_weights_start_aligned_and_load_unchanged(tmp_path):
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(1, 7, 3), paddle.nn.Flatten(), paddle.nn.Linear(7 * 9, 5))
    static = paddle.jit.to_static(layer, input_spec=[paddle.static.InputSpec([None, 1, 5, 5], "float32")],
                                  full_graph=True)
    paddle.jit.save(static, str(tmp_path / "model"))
    path = str(tmp_path / "model.pdiparams")
    assert any(offset % ALIGNMENT for offset in data_offsets(path))
    align_tensor_data(path)
    assert all(offset % ALIGNMENT == 0 for offset in data_offsets(path))
    x = paddle.randn([2, 1, 5, 5])
    np.testing.assert_array_equal(paddle.jit.load(str(tmp_path / "model"))(x).numpy(), layer(x).numpy())


def test_predictors_read_their_weights_from_the_mapped_file(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    eager = load_models(sd1_folder)
    latents = paddle.randn([1, 4, 8, 8])
    expected = eager.vae.decode(latents).numpy()
    compile_for_cpu(load_models(sd1_folder), threads=1)  # exports, and checks which weights can be lent
    (key,) = os.listdir(tmp_path)
    for graph in ("text_encoder", "unet", "vae_decoder"):
        assert all(offset % ALIGNMENT == 0 for offset in data_offsets(str(tmp_path / key / graph / "model.pdiparams")))
        assert os.path.isfile(tmp_path / key / graph / "lendable.json")
    _, _, _, decode = compile_for_cpu(load_models(sd1_folder), threads=1)
    lent = decode.weights.lendable(decode.predictor)
    arrays = decode.weights.arrays  # the predictor folds the convolutions' biases into new weights
    assert sum(arrays[name].nbytes for name in lent) >= 0.9 * sum(array.nbytes for array in arrays.values())
    np.testing.assert_allclose(decode(latents).numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())

    _, _, _, decode = compile_for_cpu(load_models(sd1_folder), threads=1)
    for name in lent:  # the mapping is private to this process: the file keeps its values
        decode.weights.arrays[name][...] = 0
    assert np.abs(decode(latents).numpy() - expected).max() > 0.1 * np.abs(expected).max()


def test_the_unet_lends_every_weight_but_the_folded_biases(sd1_folder, tmp_path, monkeypatch):
    # GEGLU's projection is sliced in two: traced as is, the predictor would own both halves.
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    _, unet, _, _ = compile_for_cpu(load_models(sd1_folder), threads=1)
    graph = unet.graph
    lent = set(graph.weights.lendable(graph.predictor))
    kept = [name for name, array in graph.weights.arrays.items() if name not in lent and array.ndim > 1]
    assert kept == []


def weights_computed_from_weights(program_prefix):
    """The operators of a saved graph whose inputs are all weights or constants, one or more of them a
    weight of two or more dimensions: Paddle Inference folds each into a new weight that it owns."""
    constant_sources = {"pd_op.full", "pd_op.full_int_array", "pd_op.assign_value_", "pd_op.assign_value"}
    paddle.enable_static()
    try:
        with paddle.static.scope_guard(paddle.static.Scope()):
            program, _, _ = paddle.static.load_inference_model(program_prefix, paddle.static.Executor())
        constant, from_weights, found = set(), set(), []
        for op in program.global_block().ops:
            inputs = [value.id for value in op.operands_source()]
            outputs = op.results()
            if op.name() == "builtin.parameter":
                constant.update(value.id for value in outputs)
                from_weights.update(value.id for value in outputs if len(value.shape) >= 2)
            elif op.name() in constant_sources:
                constant.update(value.id for value in outputs)
            elif inputs and op.name() != "pd_op.fetch" and all(value in constant for value in inputs):
                constant.update(value.id for value in outputs)
                if any(value in from_weights for value in inputs):
                    from_weights.update(value.id for value in outputs)
                    found.append(op.name())
        return found
    finally:
        paddle.disable_static()


def test_no_graph_computes_weights_from_weights(sd1_folder, tmp_path, monkeypatch):
    # The upsamplers' kernels, computed from the 3x3 weight, would be 0.35 GB of the predictor's own
    # in SD v1.5's UNet; GEGLU's sliced projection 0.38 GB.
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    compile_for_cpu(load_models(sd1_folder), threads=1)
    (key,) = os.listdir(tmp_path)
    for graph in ("text_encoder", "unet", "vae_decoder"):
        assert weights_computed_from_weights(str(tmp_path / key / graph / "model")) == [], graph


def test_mapped_pages_are_dropped_during_and_after_every_run(sd1_folder, tmp_path, monkeypatch):
    import stable_diffusion.cpu.compiled as compiled
    import stable_diffusion.cpu.mapped_weights as mapped_weights
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(mapped_weights, "DROP_INTERVAL_S", 0.0)
    _, _, _, decode = compile_for_cpu(load_models(sd1_folder), threads=1)
    events = []
    monkeypatch.setattr(decode.weights, "drop_pages", lambda: events.append("drop"))
    monkeypatch.setattr(compiled, "release_freed_heap", lambda: events.append("trim"))
    for shape in ([1, 4, 8, 8], [1, 4, 8, 8], [1, 4, 9, 7]):
        events.clear()
        decode(paddle.randn(shape))
        # From the output hook during the run (oneDNN reads weights to reorder them at a new shape,
        # matmuls read theirs on every run), then after it; then the heap's free pages go back to the OS.
        assert events.count("drop") > 2 and events[-2:] == ["drop", "trim"], shape


def test_linear_layers_leave_no_copy_of_their_weights(tmp_path):
    # oneDNN's fc would keep a reordered copy of the weights (64 MiB here); a matmul reads the mapping.
    from paddle.static import InputSpec
    from stable_diffusion.cpu.compiled import CompiledLayer

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    layer = paddle.nn.Linear(4096, 4096)
    graph = CompiledLayer(layer, [InputSpec([None, 4096], "float32", "x")], str(tmp_path / "g"), threads=1)
    before = resident_mib()
    for _ in range(3):
        graph(np.ones([4, 4096], np.float32))
    assert resident_mib() - before < 32


def test_a_damaged_cached_weights_file_says_to_delete_the_graph(sd1_folder, tmp_path, monkeypatch):
    import pytest
    from stable_diffusion.cpu.mapped_weights import MappedWeights
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    compile_for_cpu(load_models(sd1_folder), threads=1)
    (key,) = os.listdir(tmp_path)
    folder = tmp_path / key / "vae_decoder"
    path = folder / "model.pdiparams"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged.*delete"):
        MappedWeights(str(folder), str(folder / "model.json"))


def test_a_graph_without_weights_runs(tmp_path):
    """bench/ops.py times single ops (attention, SiLU) as graphs that hold no weights at all."""
    from paddle.static import InputSpec
    from stable_diffusion.cpu.compiled import CompiledLayer

    class Doubling(paddle.nn.Layer):
        def forward(self, x):
            return x + x

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = CompiledLayer(Doubling(), [InputSpec([None, 3], "float32", "x")], str(tmp_path / "graph"), 1)
    assert not os.path.exists(tmp_path / "graph" / "model.pdiparams")
    np.testing.assert_array_equal(graph(x).numpy(), 2 * x)
