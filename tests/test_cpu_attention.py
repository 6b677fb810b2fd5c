"""Attention as one C++ operator for the CPU (stable_diffusion/kernels/attention_cpu.cc) against torch."""
import shutil

import numpy as np
import paddle
import pytest
import torch

from reference import max_relative_error
from stable_diffusion.cpu import attention as cpu_attention

pytestmark = pytest.mark.skipif(not shutil.which("c++") or not cpu_attention.cpu_has_avx2_fma(),
                                reason="the operator needs a C++ compiler and a CPU with AVX2 and FMA")


@pytest.fixture(scope="module")
def kernel():
    from stable_diffusion.cpu.compiled import cache_root
    built = cpu_attention.attention_kernel(cache_root())
    assert built is not None, "the attention operator did not build: see the warning"
    return built


def torch_attention(q, k, v, heads):
    split = lambda a: torch.from_numpy(a).reshape(a.shape[0], a.shape[1], heads, -1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape).numpy()


# Queries: a register block is 6 rows and a task 24; keys: a panel is 16 and a block of values 256;
# channels per head: 16 per register block, the last one 8 wide or less. SD's own: 40, 80, 160 per head
# with 77 tokens of context; the VAE's single 512-channel head.
@pytest.mark.parametrize("batch, queries, keys, heads, dim", [
    (2, 4096 // 64, 77, 8, 40), (2, 37, 37, 8, 40), (1, 1, 1, 1, 8), (1, 5, 3, 2, 16), (2, 25, 300, 4, 80),
    (1, 13, 29, 3, 7), (1, 64, 64, 1, 512), (2, 24, 16, 5, 160), (1, 7, 17, 2, 24)])
def test_attention_operator_matches_torch(kernel, batch, queries, keys, heads, dim):
    rng = np.random.default_rng(queries * keys + dim)
    q, k, v = (rng.standard_normal((batch, n, heads * dim)).astype(np.float32) for n in (queries, keys, keys))
    ours = kernel(*map(paddle.to_tensor, (q, k, v)), heads, dim ** -0.5).numpy()
    assert max_relative_error(ours, torch_attention(q, k, v, heads)) < 1e-5


@pytest.mark.parametrize("offset", [-300.0, 300.0])
def test_attention_operator_is_stable_for_scores_far_from_zero(kernel, offset):
    # Scaled scores all near `offset`: the softmax must subtract the real row maximum (the padding keys
    # of the last panel, 20 keys into a panel of 16, must not count) or exp under- or overflows.
    rng = np.random.default_rng(0)
    q = 1 + rng.standard_normal((1, 9, 16)).astype(np.float32) * 0.1
    k = offset / 4 + rng.standard_normal((1, 20, 16)).astype(np.float32)
    v = rng.standard_normal((1, 20, 16)).astype(np.float32)
    ours = kernel(*map(paddle.to_tensor, (q, k, v)), 1, 16 ** -0.5).numpy()
    scores = q[0].astype(np.float64) @ k[0].T / 4
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    exact = probabilities / probabilities.sum(-1, keepdims=True) @ v[0]
    # Scores of 300 carry fp32 rounding of about 3e-5 (torch's fused kernel: the same error).
    assert max_relative_error(ours[0], exact) < 1e-4


def test_attention_operator_reads_views(kernel):
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 10, 3 * 24)).astype(np.float32)
    q, k, v = (paddle.to_tensor(qkv)[:, :, i * 24:(i + 1) * 24] for i in range(3))  # strided in eager mode
    ours = kernel(q, k, v, 3, 8 ** -0.5).numpy()
    expected = torch_attention(*(np.ascontiguousarray(qkv[:, :, i * 24:(i + 1) * 24]) for i in range(3)), 3)
    assert max_relative_error(ours, expected) < 1e-5


def test_attention_operator_refuses_mismatched_shapes(kernel):
    q = paddle.zeros([1, 4, 16])
    with pytest.raises(Exception, match="shapes do not match"):
        kernel(q, paddle.zeros([1, 5, 8]), paddle.zeros([1, 5, 8]), 2, 0.25)


def test_a_graph_traced_with_the_operator_holds_it_and_matches_paddles_attention(kernel, tmp_path):
    from paddle.static import InputSpec
    from stable_diffusion.cpu.compiled import CompiledLayer
    from stable_diffusion.models.layers import Attention
    paddle.seed(0)
    layer = Attention(48, heads=3, dim_head=16, cross_attention_dim=32)
    layer.query_chunks = 2
    x, context = paddle.randn([2, 30, 48]), paddle.randn([2, 7, 32])
    expected = layer(x, context).numpy()  # eager: Paddle's matmuls and softmax
    graph = CompiledLayer(layer, [InputSpec([None, None, 48], "float32", "x"),
                                  InputSpec([None, None, 32], "float32", "context")], str(tmp_path / "g"), threads=2)
    with open(graph.program) as f:
        program = f.read()
    assert "attention_cpu" in program and "softmax" not in program
    assert max_relative_error(graph(x.numpy(), context.numpy()).numpy(), expected) < 1e-5


def test_without_the_operator_graphs_keep_paddles_attention_in_a_folder_of_their_own(kernel, sd1_folder,
                                                                                      monkeypatch):
    import stable_diffusion.cpu.compiled as compiled
    with_operator = compiled.weights_fingerprint(sd1_folder)
    monkeypatch.setenv(cpu_attention.DISABLE_ENV_VAR, "1")
    assert cpu_attention.attention_kernel(compiled.cache_root()) is None
    assert compiled.weights_fingerprint(sd1_folder) != with_operator


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "attention_cpu.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_attention, "SOURCE", str(broken))
    with pytest.warns(UserWarning, match="could not build the CPU attention kernel"):
        assert cpu_attention.build_and_load(str(tmp_path / "cache")) is None


def test_the_operator_is_built_once_per_machine_not_once_per_install_folder(tmp_path):
    """Each `hub install` copies the module (a newer source file): the build folder keeps its own copy
    of the source, so a second install folder loads the built library instead of compiling again."""
    import os
    import subprocess
    import sys
    import time
    package = os.path.dirname(os.path.dirname(cpu_attention.__file__))  # stable_diffusion/
    cache = tmp_path / "cache"
    built = []
    for install in ("first", "second"):
        shutil.copytree(package, tmp_path / install / "stable_diffusion")
        time.sleep(1.1)  # the second copy's source is newer than the first's build
        code = ("from stable_diffusion.cpu.attention import attention_kernel; import sys; "
                f"sys.exit(attention_kernel({str(cache)!r}) is None)")
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path / install, check=True,
                       env={**os.environ, "PYTHONPATH": ""})
        (library,) = [os.path.join(root, name) for root, _, names in os.walk(cache) for name in names
                      if name.endswith(".so")]
        built.append(os.stat(library).st_mtime_ns)
    assert built[0] == built[1]
