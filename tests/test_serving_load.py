"""bench/serving_load.py, small: the served module under concurrent good, bad and over-budget requests,
in one process and as gunicorn workers (hub serving --use_multiprocess)."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "serving_load.py")


def load(*args, **env):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("@load "), result.stdout
    return json.loads(last[len("@load "):]), result.stdout


def test_the_server_answers_refuses_and_still_answers_under_load():
    report, output = load("--clients", "3", "--requests", "45", "--seconds", "600")
    assert report["sent"] == report["answered"] == 45, output
    assert report["5xx"] == report["no answer"] == report["wrong answers"] == 0, output
    assert report["bad accepted"] == report["good refused"] == 0, output
    assert report["repeats"] >= 3 and report["right answers"] == 18, output
    assert report["refused"] == 27 and report["refusal_kinds"] >= 20, output
    assert report["still_answers"], output
    for message in ("over the server's budget", "STABLE_DIFFUSION_MAX_PIXELS", "HTTP 413", "HTTP 415",
                    "must be a JSON object"):
        assert message in output


def test_gunicorn_workers_take_the_modules_timeout_not_gunicorns_30_s():
    # PaddleHub gives gunicorn no timeout; the module sets it (STABLE_DIFFUSION_WORKER_TIMEOUT, default
    # 3600 s). Shown both ways on a first request, which loads the weights in the worker (over 2 s):
    report, output = load("--workers", "1", "--requests", "0", "--long_request", "64", "8",
                          STABLE_DIFFUSION_WORKER_TIMEOUT="2")
    assert not report["long_request"]["ok"], output  # killed by gunicorn after 2 s
    report, output = load("--workers", "1", "--requests", "5", "--long_request", "64", "8")
    assert report["long_request"]["ok"] and report["still_answers"], output
    assert report["5xx"] == report["no answer"] == 0, output
