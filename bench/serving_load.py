"""Load on `hub serving start -m stable_diffusion`: concurrent clients, good, bad and over-budget requests.

Installs the module from this checkout into a scratch HUB_HOME, starts the server on a free loopback
port (single process, or gunicorn workers with --workers N), and sends --clients concurrent clients a
shuffled mix of --requests requests for at most --seconds: good ones (some repeated with the same seed,
which must give the same image), every kind of bad body, bodies that are not JSON, binary or
oversized, and requests over the served budget. Prints what came back, the server's memory before and
after, and whether it still answers; the last line is the summary as JSON (for tests/test_serving_load.py).

    .venv/bin/python bench/serving_load.py                       # demo model, one process
    .venv/bin/python bench/serving_load.py --workers 2           # hub serving --use_multiprocess
    .venv/bin/python bench/serving_load.py --long_request 256 120  # also one request longer than 30 s
"""
import argparse
import base64
import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HUB = os.path.join(os.path.dirname(sys.executable), "hub")
SUMMARY = "@load "
MAX_BODY_MB = 2  # the server's body limit in this run (STABLE_DIFFUSION_MAX_BODY_MB), so that an
# oversized body costs the loopback little

GOOD_PROMPTS = ["red apple", "rocket", "octopus", "rainbow", "robot face", "tangerine"]
GOOD = {"num_inference_steps": 8, "use_gpu": False}
# Each refused with status 101 and a message that says what to fix; the server goes on.
BAD_BODIES = {
    "size not a multiple of 8": {"text_prompts": "a", "width_height": [65, 64]},
    "size of the wrong type": {"text_prompts": "a", "width_height": "big"},
    "batch_size of the wrong type": {"text_prompts": "a", "batch_size": "two"},
    "unknown key": {"text_prompts": "a", "colour": "blue"},
    "no prompt": {"seed": 1},
    "empty prompt": {"text_prompts": ""},
    "prompt of the wrong type": {"text_prompts": 42},
    "NaN guidance": b'{"text_prompts": "a", "guidance_scale": NaN}',
    "negative steps": {"text_prompts": "a", "num_inference_steps": -3},
    "negative seed": {"text_prompts": "a", "seed": -1},
    "latents of the wrong shape": {"text_prompts": "a", "latents": [[1, 2]]},
    "unknown sampler": {"text_prompts": "a", "sampler": "k_lms_typo"},
    "output_dir": {"text_prompts": "a", "output_dir": "/tmp/written-by-a-client"},
    "init_image not base64": {"text_prompts": "a", "init_image": "/etc/passwd"},
    "init_image not an image": {"text_prompts": "a", "init_image": base64.b64encode(b"no picture").decode()},
    "strength out of range": {"text_prompts": "a", "strength": 2.0},
    "mask without an image": {"text_prompts": "a", "mask_image": base64.b64encode(b"x").decode()},
}
NOT_JSON = {
    "text body": (b"a red boat, please", "text/plain"),
    "malformed JSON": (b'{"text_prompts": "a"', "application/json"),
    "binary": (bytes(random.Random(0).randrange(256) for _ in range(4096)), "application/octet-stream"),
    "binary said to be JSON": (bytes(random.Random(1).randrange(256) for _ in range(4096)), "application/json"),
    "JSON list": (b'["red apple"]', "application/json"),
    "JSON string": (b'"red apple"', "application/json"),
    "oversized": (b'{"text_prompts": "a", "negative_prompt": "' + b"x" * (MAX_BODY_MB * 2 ** 20 + 10) + b'"}',
                  "application/json"),
}
OVER_BUDGET = {
    "2048x2048, 16 images, 1 step": {"text_prompts": "a", "width_height": [2048, 2048], "batch_size": 16,
                                     "num_inference_steps": 1},
    "1000 steps": {"text_prompts": "a", "num_inference_steps": 1000},
    "8 images": {"text_prompts": ["a", "b"], "batch_size": 4, "num_inference_steps": 2},
    "768 px, 4 images, 50 steps (work 118)": {"text_prompts": "a", "width_height": [768, 768], "batch_size": 4,
                                              "num_inference_steps": 50},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, content_type="application/json", timeout=900):
    """(HTTP status or None, the answer as JSON or text, seconds)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict/stable_diffusion", data=data,
                                     headers={"Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    except OSError as err:  # refused, reset, timed out
        return None, f"{type(err).__name__}: {err}", time.perf_counter() - start
    try:
        answer = json.loads(text)
    except ValueError:
        answer = text
    return status, answer, time.perf_counter() - start


def group_rss_mib(pgid):
    """Resident memory of every process in the server's process group (gunicorn's workers too)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def first_image(answer):
    from docarray import DocumentArray
    return DocumentArray.from_base64(answer["results"])[0].chunks[0].uri


def requests_to_send(count, rng):
    """[(kind, name, body, content type)]: about 40% good (half of them repeats of a seed already sent),
    the rest every bad, non-JSON and over-budget body in turn."""
    refusals = [("bad", n, b, "application/json") for n, b in BAD_BODIES.items()]
    refusals += [("not json", n, b, t) for n, (b, t) in NOT_JSON.items()]
    refusals += [("over budget", n, b, "application/json") for n, b in OVER_BUDGET.items()]
    sent, good = [], []
    for k in range(count):
        if k % 5 < 2:
            if good and k % 2:
                sent.append(rng.choice(good))  # same prompt and seed: the same image must come back
                continue
            prompt, seed = GOOD_PROMPTS[rng.randrange(len(GOOD_PROMPTS))], rng.randrange(1000)
            good.append(("good", f"{prompt} seed {seed}", {**GOOD, "text_prompts": prompt, "seed": seed},
                         "application/json"))
            sent.append(good[-1])
        else:
            sent.append(refusals[k % len(refusals)])
    rng.shuffle(sent)
    return sent


def run_load(port, plan, clients, seconds):
    queue = collections.deque(plan)
    results, lock = [], threading.Lock()
    deadline = time.time() + seconds

    def client():
        while time.time() < deadline:
            with lock:
                if not queue:
                    return
                item = queue.popleft()
            status, answer, elapsed = post(port, item[2], item[3])
            with lock:
                results.append((item, status, answer, elapsed))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def summarize(results):
    images = {}
    summary = collections.Counter()
    refusal_messages = collections.Counter()
    problems = []
    latencies = []
    for (kind, name, body, _), status, answer, elapsed in results:
        summary["sent"] += 1
        if status is None:
            summary["no answer"] += 1
            problems.append(f"{kind} {name}: {answer}")
            continue
        summary["answered"] += 1
        if status >= 500:
            summary["5xx"] += 1
            problems.append(f"{kind} {name}: HTTP {status}")
            continue
        accepted = status == 200 and isinstance(answer, dict) and answer.get("status") == "000"
        if kind == "good":
            latencies.append(elapsed)
            if not accepted:
                summary["good refused"] += 1
                problems.append(f"good {name}: {answer if isinstance(answer, str) else answer.get('msg')}")
                continue
            uri = first_image(answer)
            key = (body["text_prompts"], body["seed"])
            if key in images:
                summary["repeats"] += 1
                same = images[key] == uri
                summary["right answers" if same else "wrong answers"] += 1
                if not same:
                    problems.append(f"good {name}: another image than the first time")
            else:
                images[key] = uri
                summary["right answers"] += 1
        elif accepted:
            summary["bad accepted"] += 1
            problems.append(f"{kind} {name}: accepted")
        else:
            summary["refused"] += 1
            message = answer.get("msg", "") if isinstance(answer, dict) else str(answer)
            refusal_messages[f"HTTP {status}, {kind}: {message[:300]}"] += 1
    return summary, refusal_messages, problems, latencies


def start_server(env, port, workers):
    command = [HUB, "serving", "start", "-m", "stable_diffusion", "-p", str(port)]
    if workers:
        command += ["--use_multiprocess", "--workers", str(workers)]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, env=env, cwd=env["HUB_HOME"], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, log
        except OSError:
            if process.poll() is not None:
                log.seek(0)
                raise SystemExit("hub serving exited:\n" + log.read().decode(errors="replace"))
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("hub serving did not open its port in 180 s")


def stop_server(process):
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="STABLE_DIFFUSION_MODEL for the server")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=600, help="stop sending after this long")
    parser.add_argument("--workers", type=int, default=0, help="hub serving --use_multiprocess --workers N")
    parser.add_argument("--long_request", type=int, nargs=2, metavar=("SIZE", "STEPS"),
                        help="before the load, one good request of this size and steps, timed")
    parser.add_argument("--seed", type=int, default=0, help="the mix's shuffle")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="sd-load-")
    env = {**os.environ, "HUB_HOME": home, "STABLE_DIFFUSION_MODEL": args.model, "PYTHONPATH": "",
           "STABLE_DIFFUSION_MAX_BODY_MB": str(MAX_BODY_MB)}
    try:
        installed = subprocess.run([HUB, "install", os.path.join(REPO, "stable_diffusion")], env=env, cwd=home,
                                   capture_output=True, text=True)
        if installed.returncode:
            raise SystemExit("hub install failed:\n" + installed.stdout + installed.stderr)
        port = free_port()
        start = time.perf_counter()
        process, log = start_server(env, port, args.workers)
        report = {"mode": f"--use_multiprocess --workers {args.workers}" if args.workers else "single process",
                  "model": args.model, "clients": args.clients, "started_s": round(time.perf_counter() - start, 1),
                  "rss_mib_started": round(group_rss_mib(process.pid))}
        try:
            if args.long_request:
                size, steps = args.long_request
                status, answer, elapsed = post(port, {**GOOD, "text_prompts": "rocket", "seed": 0,
                                                      "width_height": [size, size], "num_inference_steps": steps})
                ok = status == 200 and isinstance(answer, dict) and answer.get("status") == "000"
                report["long_request"] = {"size": size, "steps": steps, "seconds": round(elapsed, 1), "ok": ok,
                                          "answer": None if ok else str(answer)[:300]}
            plan = requests_to_send(args.requests, random.Random(args.seed))
            start = time.perf_counter()
            results = run_load(port, plan, args.clients, args.seconds)
            report["load_s"] = round(time.perf_counter() - start, 1)
            report["rss_mib_after"] = round(group_rss_mib(process.pid))
            status, answer, _ = post(port, {**GOOD, "text_prompts": "rocket", "seed": 5})
            report["still_answers"] = status == 200 and isinstance(answer, dict) and answer.get("status") == "000"
        finally:
            stop_server(process)
        summary, messages, problems, latencies = summarize(results)
        report.update(summary)
        for key in ("sent", "answered", "right answers", "wrong answers", "repeats", "refused", "bad accepted",
                    "good refused", "5xx", "no answer"):
            report.setdefault(key, 0)
        if latencies:
            report["good_request_s"] = {"median": round(sorted(latencies)[len(latencies) // 2], 2),
                                        "max": round(max(latencies), 2)}
        report["refusal_kinds"] = len(messages)
        report["problems"] = problems[:20]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"# {' '.join([os.path.relpath(sys.executable), os.path.relpath(__file__)] + sys.argv[1:])}")
    for key, value in report.items():
        if key not in ("problems", "refusal_kinds"):
            print(f"{key:>18}: {value}")
    print("refusals, by message:")
    for message, count in sorted(messages.items()):
        print(f"  {count:3d} x {message}")
    for problem in problems:
        print(f"  PROBLEM {problem}")
    print(SUMMARY + json.dumps(report))


if __name__ == "__main__":
    main()
