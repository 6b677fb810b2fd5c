"""The three doors end to end: hub install into a temporary HUB_HOME, hub run, hub serving."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from docarray import DocumentArray

REPO = os.path.join(os.path.dirname(__file__), "..")
HUB = os.path.join(os.path.dirname(sys.executable), "hub")


def hub(*args, env, timeout=300):
    result = subprocess.run([HUB, *args], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=env["WORKDIR"])
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, sd1_folder):
    home = tmp_path_factory.mktemp("hub-home")
    workdir = tmp_path_factory.mktemp("hub-cwd")
    env = {**os.environ, "HUB_HOME": str(home), "STABLE_DIFFUSION_MODEL": sd1_folder, "WORKDIR": str(workdir),
           "PYTHONPATH": ""}
    code, output = hub("install", os.path.join(REPO, "stable_diffusion"), env=env)
    assert code == 0 and os.path.isdir(home / "modules" / "stable_diffusion"), output
    yield env
    hub("uninstall", "stable_diffusion", env=env)


def test_hub_run_writes_images(hub_env, tmp_path):
    out = tmp_path / "out"
    code, output = hub("run", "stable_diffusion", "--text_prompts", "a small red boat", "--output_dir", str(out),
                       "--width_height", "64", "64", "--num_inference_steps", "2", "--seed", "4",
                       "--batch_size", "2", "--use_gpu", "0", env=hub_env)
    assert code == 0, output
    files = sorted(os.listdir(out))
    assert len(files) == 3 and all(f.endswith(".png") for f in files), (files, output)
    assert str(out) in output


def test_hub_run_a_module_folder_with_use_gpu_as_the_original_module_spells_it(hub_env, tmp_path):
    # Given a folder, PaddleHub's `hub run` calls the module class, not an instance (it used to fail
    # with "'property' object is not callable"); `--use_gpu True/False` as the original module's CLI.
    out = tmp_path / "out"
    code, output = hub("run", os.path.abspath(os.path.join(REPO, "stable_diffusion")), "--text_prompts", "a boat",
                       "--output_dir", str(out), "--width_height", "64", "64", "--num_inference_steps", "2",
                       "--use_gpu", "False", env=hub_env)
    assert code == 0 and "Traceback" not in output, output
    assert len(os.listdir(out)) == 1, output
    code, output = hub("run", "stable_diffusion", "--text_prompts", "a boat", "--use_gpu", "maybe", env=hub_env)
    assert "expected True, False, 1 or 0, got 'maybe'" in output


def test_hub_run_image_to_image_and_inpainting_from_files(hub_env, tmp_path):
    from PIL import Image
    start, mask = tmp_path / "start.png", tmp_path / "mask.png"
    Image.fromarray((np.random.default_rng(0).random((64, 72, 3)) * 255).astype(np.uint8)).save(start)
    Image.fromarray(np.tile(np.uint8([0, 255]).repeat(36), (64, 1))).save(mask)
    out = tmp_path / "out"
    code, output = hub("run", "stable_diffusion", "--text_prompts", "a boat", "--output_dir", str(out),
                       "--init_image", str(start), "--strength", "0.6", "--num_inference_steps", "3",
                       "--mask_image", str(mask), "--use_gpu", "0", env=hub_env)
    assert code == 0 and "Traceback" not in output, output
    (name,) = os.listdir(out)
    assert Image.open(out / name).size == (72, 64)


def test_hub_run_help_lists_arguments(hub_env):
    code, output = hub("run", "stable_diffusion", "--help", env=hub_env)
    for option in ("--text_prompts", "--negative_prompt", "--sampler", "--prompts_file", "--model"):
        assert option in output


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, raw=False, timeout=300):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict/stable_diffusion", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server(hub_env):
    port = free_port()
    process = subprocess.Popen([HUB, "serving", "start", "-m", "stable_diffusion", "-p", str(port)], env=hub_env,
                               cwd=hub_env["WORKDIR"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            time.sleep(1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("hub serving did not open its port in 120 s")
    yield port
    os.killpg(process.pid, signal.SIGTERM)  # the hub process is the server: stop it by its own id
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    shutil.rmtree(os.path.join(hub_env["HUB_HOME"], "conf"), ignore_errors=True)


GOOD = {"text_prompts": "a lighthouse", "width_height": [64, 64], "num_inference_steps": 2, "seed": 9,
        "use_gpu": False}


def image_of(results):
    return DocumentArray.from_base64(results)[0].chunks[0].load_uri_to_image_tensor().tensor


def test_serving_answers_refuses_and_answers_again(server):
    status, answer = post(server, GOOD)
    assert status == 200 and answer["status"] == "000", answer
    first = image_of(answer["results"])
    assert first.shape == (64, 64, 3)

    status, answer = post(server, {**GOOD, "width_height": [65, 64]})
    assert answer["status"] != "000" and "multiples of 8" in answer["msg"], answer

    status, answer = post(server, {**GOOD, "colour": "blue"})
    assert answer["status"] != "000" and "unknown parameters ['colour']" in answer["msg"], answer

    status, answer = post(server, {**GOOD, "output_dir": "/tmp/anywhere"})
    assert answer["status"] != "000" and "output_dir cannot be set through serving" in answer["msg"], answer
    assert not os.path.exists("/tmp/anywhere")

    status, answer = post(server, b"{not json", raw=True)
    assert status == 400 or answer["status"] != "000"

    status, answer = post(server, {**GOOD, "seed": 10})
    assert answer["status"] == "000"

    import base64
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    status, answer = post(server, {**GOOD, "init_image": "data:image/png;base64," + png, "strength": 0.5})
    assert answer["status"] == "000", answer
    assert DocumentArray.from_base64(answer["results"])[0].chunks[0].tags["strength"] == 0.5
    status, answer = post(server, {**GOOD, "init_image": "not base64 at all!"})
    assert answer["status"] != "000" and "init_image is not valid base64" in answer["msg"], answer
    status, answer = post(server, {**GOOD, "init_image": base64.b64encode(b"no picture").decode()})
    assert answer["status"] != "000" and "init_image is not an image" in answer["msg"], answer
    status, answer = post(server, {**GOOD, "init_image": "/etc/passwd"})
    assert answer["status"] != "000", answer  # a path is not base64 here: the server reads no client-named file
    status, answer = post(server, GOOD)
    assert answer["status"] == "000"
    np.testing.assert_array_equal(image_of(answer["results"]), first)  # same seed, same image
