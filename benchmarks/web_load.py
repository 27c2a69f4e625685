"""The web app under load: two training jobs and many concurrent sampling requests through `gradio_client`.

Starts `studio serve` on 127.0.0.1 (a free port, a fresh temporary --data-dir, --workers 2 by default), then
through the page's API:

* starts `--jobs` LoRA training runs on ShapesWorld data (`--steps` steps each), each from its own Client, and
  polls them (`/watch_train`) until they end;
* meanwhile sends one `/sample` request from each of `--clients` separate Clients at once (threads; client i asks
  for its own prompt, "a <colour> <shape>" from the toy vocabulary, with seed i), and waits for all of them
  (each bounded by `--timeout`);
* checks the outputs: every request returned its image with its own caption (prompt · seed), the file the
  client downloaded opens with PIL and is byte-identical to the one in the request's own job folder, whose
  settings.json names the client's prompt and seed; no two clients got the same pixels; after the load, one
  more request with the same prompt and seed as a few of the clients gives exactly their pixels; each training
  job ended done with its artifact file; the job queue never ran more than --workers jobs at once; SIGTERM
  stops the server with its one "Diffusion Studio stopping" line and no traceback;
* samples the RSS of the server process and of its children (the job workers) every 0.2 s.

Writes (and prints) one JSON object; exits non-zero if a request failed or a check did not hold. Keep the
worker processes to one thread on a small machine:

    $ OMP_NUM_THREADS=1 python benchmarks/web_load.py --output benchmarks/results/web-load.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from studio.testing import form_values, start_server

SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]
TRAIN_SHAPES = ["star", "heart"]  # the held-out shapes: what a toy LoRA is for


def prompts(n: int) -> list[str]:
    """n different prompts from the toy vocabulary: "a red circle", "an orange circle", ... (30, then repeats).

    Example:
        >>> prompts(3)
        ['a red circle', 'an orange circle', 'a yellow circle']
    """
    every = [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
             for shape, colour in itertools.product(SHAPES, COLOURS)]
    return [every[i % len(every)] for i in range(n)]


# -- the server ---------------------------------------------------------------------------


def stop_server(process: subprocess.Popen, root: Path) -> list[str]:
    """SIGTERM, as a user's Ctrl-C or a service manager stops it; what went wrong, if anything."""
    problems = []
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return ["the server did not stop within 90 s of SIGTERM (killed)"]
    log = (root / "server.log").read_text()
    if code != 0:
        problems.append(f"the server exited with status {code} on SIGTERM")
    if log.count("Diffusion Studio stopping") != 1:
        problems.append(f"the server log has {log.count('Diffusion Studio stopping')} 'Diffusion Studio stopping' lines")
    if "Traceback" in log or "Exception ignored" in log:
        problems.append("the server log has a traceback:\n" + log[-3000:])
    return problems


# -- memory ---------------------------------------------------------------------------------


def _rss_proc(pid: int) -> int:
    """VmRSS of one process in bytes, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children_proc(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc/*/stat (parent pid is the 4th field)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_of_tree(pid: int) -> tuple[int, int, int]:
    """(RSS of the process, summed RSS of its descendants, how many descendants), in bytes."""
    try:
        import psutil
    except ImportError:
        children = _children_proc(pid)
        return _rss_proc(pid), sum(_rss_proc(c) for c in children), len(children)
    try:
        process = psutil.Process(pid)
        own = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    total = 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass  # ended between the listing and the reading
    return own, total, len(children)


class MemorySampler(threading.Thread):
    """The server's RSS, its workers' and their sum, every `period` seconds, keeping the peaks."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_server = self.peak_children = self.peak_total = self.samples = self.most_children = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            own, children, count = rss_of_tree(self.pid)
            self.peak_server = max(self.peak_server, own)
            self.peak_children = max(self.peak_children, children)
            self.peak_total = max(self.peak_total, own + children)
            self.most_children = max(self.most_children, count)
            self.samples += 1
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def mb(n: int) -> float:
    return round(n / 2**20, 1)


# -- the page's API, as tests/test_ui.py calls it ---------------------------------------------


def _value(x):
    return x["value"] if isinstance(x, dict) and "value" in x else x


def _path(x) -> str:
    """The local path in a file output: a path, {"path": ...}, a gallery item {"image": ...} or an update {"value": ...}."""
    while isinstance(x, dict):
        x = x.get("image") or x.get("value") or x.get("path")
    return x


def train_job(url: str, download_dir: Path, shape: str, steps: int) -> dict:
    """Start one LoRA run from the Train form (its own Client), poll /watch_train until it ends."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(download_dir))
    values = form_values(client, "/start_train", method="lora",
                         **{"ShapesWorld spec": f"shapesworld:shape={shape},count=4,colors=red|blue,caption=a {{color}} sks",
                            "max train steps": steps, "train batch size": 2, "learning rate": 1e-3,
                            "validation prompt": "a red sks", "validation steps": steps, "rank": 4})
    started = time.time()
    job, command = client.predict(*values, api_name="/start_train")
    job_id = _value(job)
    status = log = ""
    while time.time() < started + 1800:
        status, progress, loss, gallery, artifact, log, _ = client.predict(job_id, api_name="/watch_train")
        if any(word in status for word in ("**done**", "**failed**", "**stopped**")):
            break
        time.sleep(1)
    return {"id": job_id, "command": command, "status": status, "progress": progress, "loss_points": len(loss["data"]),
            "gallery": len(gallery), "artifact": _path(artifact) if artifact else None, "log": log,
            "seconds": round(time.time() - started, 1), "shape": shape}


def sample_request(url: str, download_dir: Path, prompt: str, seed: int, steps: int, timeout: float) -> dict:
    """One client's /sample request (its own Client and session); its latency counts from the submit."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(download_dir))
    started = time.time()
    job = client.submit(prompt, "", str(seed), steps, 5.0, "model default", None, None, api_name="/sample")
    gallery, command, info, download = job.result(timeout=timeout)
    return {"prompt": prompt, "seed": seed, "latency": time.time() - started, "gallery": gallery, "command": command,
            "info": info, "download": _path(download) if download else None}


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def check_sample(result: dict, data: Path) -> list[str]:
    """What is wrong with one client's response (nothing: []): its image, caption, file and job folder."""
    who = f"client seed {result['seed']} ({result['prompt']!r})"
    gallery = result["gallery"]
    if len(gallery) != 1:
        return [f"{who}: {len(gallery)} images returned, expected 1"]
    item = gallery[0]
    problems = []
    caption = item.get("caption") if isinstance(item, dict) else None
    if caption != f"{result['prompt']} · seed {result['seed']}":
        problems.append(f"{who}: caption {caption!r}")
    local = Path(_path(item))
    if not local.is_file():
        return problems + [f"{who}: the downloaded image {local} does not exist"]
    try:
        result["pixels"] = pixels(str(local))
    except OSError as err:
        return problems + [f"{who}: the image does not open: {err}"]
    if result["pixels"].std() < 5:
        problems.append(f"{who}: a flat image (std {result['pixels'].std():.1f})")
    # Its own job: "1 images · job <id>", whose folder holds this prompt and seed and the same file.
    job_id = result["info"].split("· job ", 1)[-1].split()[0] if "· job " in result["info"] else None
    settings = data / "jobs" / str(job_id) / "out" / "settings.json"
    if not job_id or not settings.is_file():
        return problems + [f"{who}: no job folder for info {result['info']!r}"]
    result["job"] = job_id
    record = json.loads(settings.read_text())
    images = record["images"]
    if [(i["prompt"], int(i["seed"])) for i in images] != [(result["prompt"], result["seed"])]:
        problems.append(f"{who}: its job {job_id} sampled {[(i['prompt'], i['seed']) for i in images]}")
    elif (data / "jobs" / job_id / "out" / images[0]["file"]).read_bytes() != local.read_bytes():
        problems.append(f"{who}: the downloaded image differs from its job's file")
    if f"--seed {result['seed']} " not in result["command"] + " " or result["prompt"] not in result["command"]:
        problems.append(f"{who}: command {result['command']!r}")
    return problems


def most_at_once(data: Path) -> int:
    """The most jobs that ran at the same time, from every job.json's started/ended."""
    events = []
    for path in (data / "jobs").glob("*/job.json"):
        job = json.loads(path.read_text())
        if job.get("started"):
            events += [(job["started"], 1), (job.get("ended") or time.time(), -1)]
    running = most = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += change
        most = max(most, running)
    return most


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, root: Path) -> dict:
    failures: list[str] = []
    downloads = root / "downloads"
    extra_requests: list[float] = []  # latencies of the waves after the first
    rss_after_rounds: list[float] = []
    process, url = start_server(root, "--host", "127.0.0.1", "--workers", str(args.workers),
                                "--max-sessions", str(args.max_sessions), timeout=180)
    data = root / "data"
    try:
        time.sleep(2)  # settled after the first page load
        server_before, _, _ = rss_of_tree(process.pid)
        sampler = MemorySampler(process.pid)
        sampler.start()
        wall = time.time()
        n = args.clients + args.jobs
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            jobs = [pool.submit(train_job, url, downloads / f"train-{i}", TRAIN_SHAPES[i % 2], args.steps)
                    for i in range(args.jobs)]
            time.sleep(args.stagger)  # the training jobs are queued first: the requests come while they run
            requests = [pool.submit(sample_request, url, downloads / f"client-{i}", prompt, i, args.sample_steps,
                                    args.timeout) for i, prompt in enumerate(prompts(args.clients))]
            results, latencies = [], []
            for i, future in enumerate(requests):
                try:
                    result = future.result(timeout=args.timeout + 120)
                except Exception as err:  # noqa: BLE001 - every failure is reported, not raised
                    failures.append(f"request {i}: {type(err).__name__}: {err}")
                    continue
                problems = check_sample(result, data)
                failures += problems
                if not problems:
                    results.append(result)
                latencies.append(result["latency"])
            trained = []
            for i, future in enumerate(jobs):
                try:
                    trained.append(future.result(timeout=1800))
                except Exception as err:  # noqa: BLE001
                    failures.append(f"training job {i}: {type(err).__name__}: {err}")
        wall = time.time() - wall
        jobs_ok = 0
        for job in trained:
            artifact = data / "jobs" / job["id"] / "out" / "lora.safetensors"
            ok = ("**done**" in job["status"] and f"step {args.steps} / {args.steps}" in job["progress"]
                  and job["loss_points"] == args.steps and artifact.is_file() and artifact.stat().st_size > 0
                  and job["artifact"] is not None and Path(job["artifact"]).read_bytes() == artifact.read_bytes())
            jobs_ok += ok
            if not ok:
                failures.append(f"training job {job['id']} ({job['shape']}): {job['status']!r}, {job['progress']!r}, "
                                f"{job['loss_points']} loss points, artifact {job['artifact']}\n{job['log']}")
        # Every client got pixels of its own: no two the same.
        digests = {}
        for result in results:
            digests.setdefault(hashlib.sha256(result["pixels"].tobytes()).hexdigest(), []).append(result["seed"])
        same = [seeds for seeds in digests.values() if len(seeds) > 1]
        outputs_distinct = not same and len(results) == args.clients
        if same:
            failures.append(f"clients with identical images (by seed): {same}")
        if len({r["job"] for r in results}) != len(results):
            failures.append("two clients were answered from the same job")
        # After the load, the same prompt and seed again (a fresh client): exactly the same pixels.
        repeats = []
        for result in [results[0], results[-1]] if len(results) > 1 else results:
            try:
                again = sample_request(url, downloads / f"repeat-{result['seed']}", result["prompt"], result["seed"],
                                       args.sample_steps, args.timeout)
                problems = check_sample(again, data)
            except Exception as err:  # noqa: BLE001
                problems = [f"repeat of seed {result['seed']}: {type(err).__name__}: {err}"]
            failures += problems
            identical = not problems and np.array_equal(again["pixels"], result["pixels"])
            if not problems and not identical:
                diff = np.abs(again["pixels"].astype(int) - result["pixels"].astype(int)).max()
                failures.append(f"repeat of seed {result['seed']} ({result['prompt']!r}) differs (max |diff| {diff})")
            repeats.append(identical)
        repeat_identical = bool(repeats) and all(repeats)
        time.sleep(2)
        rss_after_rounds = [mb(rss_of_tree(process.pid)[0])]
        # More waves of the same requests (no training): the server's memory after each says whether it is bounded
        # or grows with the requests it has served.
        for wave in range(1, args.rounds):
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
                more = [pool.submit(sample_request, url, downloads / f"wave-{wave}-client-{i}", prompt, i,
                                    args.sample_steps, args.timeout) for i, prompt in enumerate(prompts(args.clients))]
                for i, future in enumerate(more):
                    try:
                        result = future.result(timeout=args.timeout + 120)
                    except Exception as err:  # noqa: BLE001
                        failures.append(f"wave {wave} request {i}: {type(err).__name__}: {err}")
                        continue
                    failures += check_sample(result, data)
                    extra_requests.append(result["latency"])
            time.sleep(2)
            rss_after_rounds.append(mb(rss_of_tree(process.pid)[0]))
        server_after, children_after, _ = rss_of_tree(process.pid)
        sampler.stop()
        at_once = most_at_once(data)
        if at_once > args.workers:
            failures.append(f"{at_once} jobs ran at once with --workers {args.workers}")
    finally:
        stop_problems = stop_server(process, root)
    failures += stop_problems
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import gradio_client

    failed = args.clients - len(results)
    return {
        "clients": args.clients, "jobs": args.jobs, "workers": args.workers, "train_steps": args.steps,
        "sample_steps": args.sample_steps,
        "requests_ok": len(results), "requests_failed": failed, "failures": failures,
        "latency_s": {"median": round(statistics.median(latencies), 2) if latencies else None,
                      "max": round(max(latencies), 2) if latencies else None},
        "wall_s": round(wall, 1),
        "jobs_ok": jobs_ok, "train_job_s": [job["seconds"] for job in trained],
        "most_jobs_running_at_once": at_once,
        "peak_server_rss_mb": mb(sampler.peak_server), "peak_workers_rss_mb": mb(sampler.peak_children),
        "peak_total_rss_mb": mb(sampler.peak_total), "most_worker_processes": sampler.most_children,
        "server_rss_before_mb": mb(server_before), "server_rss_after_mb": mb(server_after),
        "max_sessions": args.max_sessions, "rounds": args.rounds,
        "server_rss_after_each_round_mb": rss_after_rounds,
        "requests_after_the_first_round_ok": len(extra_requests),
        "workers_rss_after_mb": mb(children_after), "rss_samples": sampler.samples,
        "outputs_distinct": outputs_distinct, "repeat_identical": repeat_identical,
        "server_stopped_cleanly": not stop_problems,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch_version,
                    "gradio_client": gradio_client.__version__, "platform": platform.platform(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent sampling clients (one request each)")
    parser.add_argument("--jobs", type=int, default=2, help="training jobs started through the page")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each job")
    parser.add_argument("--sample-steps", type=int, default=10, help="denoising steps of each sampling request")
    parser.add_argument("--workers", type=int, default=2, help="studio serve --workers (jobs run at once)")
    parser.add_argument("--max-sessions", type=int, default=200, help="studio serve --max-sessions")
    parser.add_argument("--rounds", type=int, default=1,
                        help="waves of --clients sampling requests (the first beside the training jobs); the server's "
                             "memory is read after each")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one sampling request may take")
    parser.add_argument("--stagger", type=float, default=3.0,
                        help="seconds between starting the training jobs and sending the sampling requests")
    parser.add_argument("--output", default=None, help="write the JSON here too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder (its path is printed)")
    args = parser.parse_args()
    if min(args.workers, args.clients, args.rounds, args.max_sessions) < 1:
        parser.error("--workers, --clients, --rounds and --max-sessions must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="studio-web-load-"))
    tempfile.tempdir = str(root / "client-tmp")  # gradio_client's partial downloads stay under root too
    Path(tempfile.tempdir).mkdir()
    try:
        result = run(args, root)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    ok = (not result["failures"] and result["requests_failed"] == 0 and result["jobs_ok"] == args.jobs
          and result["outputs_distinct"] and result["repeat_identical"] and result["server_stopped_cleanly"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
