import os
import sys
import tempfile

# PaddleHub, paddlenlp and huggingface_hub read their homes once, at first import: point them at a
# scratch folder before anything imports them, so tests never touch the user's caches.
_HOME = tempfile.mkdtemp(prefix="sd-tests-home-")
for var, sub in (("HUB_HOME", "hub"), ("PPNLP_HOME", "ppnlp"), ("HF_HOME", "hf"),
                 ("STABLE_DIFFUSION_CACHE", "compiled")):
    os.environ[var] = os.path.join(_HOME, sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import paddle  # noqa: E402
import pytest  # noqa: E402

import reference  # noqa: E402

paddle.base.core.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def reference_models(request):
    return request.param, reference.build_reference(request.param)


@pytest.fixture(scope="session")
def sd1_reference():
    return reference.build_reference("sd1")


@pytest.fixture(scope="session")
def diffusers_folder(tmp_path_factory, reference_models):
    kind, models = reference_models
    folder = reference.save_diffusers_folder(models, str(tmp_path_factory.mktemp(f"tiny-{kind}")))
    return kind, models, folder


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory, sd1_reference):
    return reference.save_diffusers_folder(sd1_reference, str(tmp_path_factory.mktemp("tiny-sd1")))
