"""Attention as one C++ operator for the CPU (kernels/attention_cpu.cc), built on first use.

Paddle has no fused attention on the CPU; with two matmuls and a softmax, attention cost a 512 px UNet
step 28% of its time against 20% of diffusers' (bench/NOTES.md sections 25, 26). The operator is compiled with the
machine's C++ compiler through `paddle.utils.cpp_extension` (about 20 s, once per Paddle version and
source) into the graph cache. Where it cannot be built (no AVX2 and FMA, no compiler) the graphs keep
Paddle's matmuls and softmax, with a warning.
"""
import hashlib
import os
import platform
import shutil
import warnings

import paddle

SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "attention_cpu.cc")
DISABLE_ENV_VAR = "STABLE_DIFFUSION_NO_CPU_KERNELS"


def cpu_has_avx2_fma():
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags


def build_folder(cache_root):
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + paddle.__version__.encode()).hexdigest()[:16]
    return os.path.join(cache_root, "kernels", digest)


BUILT_OPERATOR = []  # the operator (or None), once per process: Paddle registers an operator's name once


def attention_kernel(cache_root):
    """`kernel(q, k, v, heads, scale)` on [B, L, H*D] float32 tensors, or None where it cannot be built
    or STABLE_DIFFUSION_NO_CPU_KERNELS is set. Built into the first `cache_root` asked for."""
    if os.environ.get(DISABLE_ENV_VAR):
        return None
    if not BUILT_OPERATOR:
        BUILT_OPERATOR.append(build_and_load(cache_root))
    return BUILT_OPERATOR[0]


def build_and_load(cache_root):
    if not cpu_has_avx2_fma():
        warnings.warn("this CPU lacks AVX2 and FMA: attention runs as Paddle's matmuls and softmax (slower)")
        return None
    from paddle.utils.cpp_extension import load

    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    folder = build_folder(cache_root)
    os.makedirs(folder, exist_ok=True)
    # Built from a copy of the source kept in the (content-addressed) build folder: setuptools rebuilds
    # when a source is newer than the library, and each install folder's copy is new (a 25 s rebuild
    # per `hub install` until this), so the operator is built once per machine and Paddle version.
    source = os.path.join(folder, os.path.basename(SOURCE))
    if not os.path.isfile(source):
        partial = f"{source}.{os.getpid()}.partial"
        shutil.copyfile(SOURCE, partial)
        os.replace(partial, source)
    try:
        # Paddle's own OpenMP runtime (Intel's, which takes GNU's calls): a second runtime's threads
        # would spin beside Paddle's on the same cores.
        module = load(name="stable_diffusion_attention_cpu", sources=[source], build_directory=folder,
                      extra_cxx_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                      extra_ldflags=[f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"])
    except Exception as error:  # the compiler's own message says what is missing
        warnings.warn(f"could not build the CPU attention kernel, attention runs as Paddle's matmuls and "
                      f"softmax (slower): {error}")
        return None
    return module.attention_cpu
