"""The README's first command, exactly as written, from the repo root: what every newcomer runs first.

Read out of README.md, so the two cannot drift apart. The second command (set up and run the tests) is
what CI runs; running it here would run this suite inside itself, so only its install step is checked.
"""
import os
import subprocess

import numpy as np
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def readme_commands():
    """The indented command lines at the top of README.md, before its first section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        head = f.read().split("\n## ")[0]
    return [line.strip() for line in head.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_gives_a_run_command_and_a_test_command():
    run, tests = readme_commands()
    assert "hub run stable_diffusion" in run and "--model demo" in run
    assert "pip install -r requirements.txt -r requirements-dev.txt" in tests and "pytest" in tests
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        assert "-r requirements.txt -r requirements-dev.txt" in f.read()


def test_readme_first_command_makes_a_picture_from_the_repo_root(tmp_path):
    run, _ = readme_commands()
    out_dir = os.path.join(REPO, "stable_diffusion_out")
    existed = os.path.isdir(out_dir)
    before = set(os.listdir(out_dir)) if existed else set()
    env = {**os.environ, "HUB_HOME": str(tmp_path / "hub"), "PYTHONPATH": ""}
    env.pop("STABLE_DIFFUSION_MODEL", None)
    env.pop("VIRTUAL_ENV", None)
    try:
        result = subprocess.run(run, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        printed = [line.strip() for line in result.stdout.splitlines() if line.strip().endswith(".png")]
        saved = sorted(set(os.listdir(out_dir)) - before)
        assert printed and len(saved) == len(printed), output[-4000:]
        for path in printed:
            assert os.path.dirname(os.path.abspath(path)) == out_dir and os.path.isfile(path), path
            image = np.asarray(Image.open(path).convert("RGB"))
            assert image.shape == (64, 64, 3) and image.std() > 10, "not a picture: flat or of the wrong size"
        assert "Traceback" not in output, output[-4000:]
    finally:
        if os.path.isdir(out_dir):
            for name in set(os.listdir(out_dir)) - before:
                os.remove(os.path.join(out_dir, name))
            if not existed:
                os.rmdir(out_dir)
