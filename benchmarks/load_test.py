"""Load and fault test of the web app through gradio_client on localhost.

    python benchmarks/load_test.py [--clients 16] [--duration 120] [--min-requests 500] [--threads 2]

Starts `python app.py` (torch limited to --threads) and runs three phases:
1. load: --clients concurrent clients for --duration seconds (and until --min-requests are served) mixing analysis,
   timestep scrubbing, threshold changes, morphs and bad uploads; counts failures, p50/p95 latency per endpoint, the app
   process's memory after every 100 requests and its peak, and checks that repeated analyses of an image agree;
2. overflow: more simultaneous analyses than the queue holds, which must be refused at once, not left hanging;
3. disconnect: a client process is killed mid-morph; the server must stop computing frames.
Adds a "reliability" section to benchmarks/results.json / results.md (bad input itself is tests/test_bad_input.py's).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Relative frequency of each action; every client starts with an analysis so scrubs and thresholds have a state.
MIX = {"analyse": 0.30, "timestep": 0.30, "threshold": 0.20, "morph": 0.10, "bad_upload": 0.10}
MORPH_LOOPS = 3


def truncated_png() -> bytes:
    """The first half of a PNG of noise: a corrupt upload the app must refuse with a clear message."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: buffer.tell() // 2]


def memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class Recorder:
    def __init__(self, pid: int):
        self.pid = pid
        self.lock = threading.Lock()
        self.latency = defaultdict(list)
        self.failures: list[str] = []
        self.expected_errors = 0
        self.scores = defaultdict(set)
        self.memory_by_requests: list[tuple[int, float]] = []

    @property
    def served(self) -> int:
        return sum(len(v) for v in self.latency.values()) + self.expected_errors

    def record(self, endpoint: str, seconds: float | None, failure: str | None = None, expected_error: bool = False):
        with self.lock:
            if failure:
                self.failures.append(f"{endpoint}: {failure}")
            elif expected_error:
                self.expected_errors += 1
            else:
                self.latency[endpoint].append(seconds)
            if self.served % 100 == 0 and self.served:
                self.memory_by_requests.append((self.served, memory_kib(self.pid)["VmRSS"] / 1024))


def client_loop(url: str, category: str, images: list[str], bad_file: str, stop: threading.Event, rec: Recorder, seed: int):
    from gradio_client import Client, handle_file

    rng = random.Random(seed)
    client = Client(url, verbose=False, httpx_kwargs={"timeout": 900})
    action = "analyse"
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            if action == "analyse":
                image = rng.choice(images)
                details = client.predict(handle_file(image), category, api_name="/analyse")[1]
                with rec.lock:
                    rec.scores[image].add(details["score"])
            elif action == "timestep":
                client.predict(rng.choice((5, 20, 50, 200, 400, 500)), api_name="/timestep")  # t
            elif action == "threshold":
                client.predict("Combined", round(rng.uniform(0, 3), 2), round(rng.uniform(0, 10), 2), api_name="/threshold")
            elif action == "morph":
                client.predict(handle_file(rng.choice(images)), category, 0.02, 5, MORPH_LOOPS, 0, api_name="/morph")
            else:
                try:
                    client.predict(handle_file(bad_file), category, api_name="/analyse")
                    rec.record(action, None, failure="a corrupt upload was accepted")
                except Exception as exc:  # the expected, clean refusal
                    ok = "corrupt or truncated" in str(exc) or "not a readable" in str(exc)
                    rec.record(action, None, failure=None if ok else f"unexpected message {exc}", expected_error=ok)
                action = rng.choices(list(MIX), weights=list(MIX.values()))[0]
                continue
            rec.record(action, time.perf_counter() - t0)
        except Exception as exc:
            rec.record(action, None, failure=f"{type(exc).__name__}: {exc}")
        action = rng.choices(list(MIX), weights=list(MIX.values()))[0]


def load_phase(url, pid, args, images, bad_file) -> dict:
    rec = Recorder(pid)
    stop = threading.Event()
    start_memory = memory_kib(pid)["VmRSS"] / 1024
    threads = [threading.Thread(target=client_loop, args=(url, args.category, images, bad_file, stop, rec, i), daemon=True)
               for i in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    while True:
        time.sleep(1)
        elapsed = time.perf_counter() - start
        if (elapsed >= args.duration and rec.served >= args.min_requests) or elapsed >= 3 * args.duration:
            break
    stop.set()
    for thread in threads:
        thread.join(timeout=900)
    elapsed = time.perf_counter() - start
    all_latency = [s for v in rec.latency.values() for s in v]
    memory = rec.memory_by_requests
    steady = [m for n, m in memory if n >= 200] or [m for _, m in memory]
    return {
        "clients": args.clients, "duration_s": round(elapsed, 1), "requests": rec.served, "failures": len(rec.failures),
        "failure_examples": rec.failures[:5], "refused_bad_uploads": rec.expected_errors,
        "per_endpoint": {
            name: {"requests": len(v), "p50_s": round(float(np.percentile(v, 50)), 3), "p95_s": round(float(np.percentile(v, 95)), 3)}
            for name, v in sorted(rec.latency.items())
        },
        "p50_s": round(float(np.percentile(all_latency, 50)), 3), "p95_s": round(float(np.percentile(all_latency, 95)), 3),
        "rss_before_mb": round(start_memory, 1),
        "rss_by_requests_mb": [[n, round(m, 1)] for n, m in memory],
        "peak_rss_mb": round(memory_kib(pid)["VmHWM"] / 1024, 1),
        "rss_growth_after_200_requests_mb": round(max(steady) - steady[0], 1) if steady else None,
        "images_with_differing_scores": sum(len(s) > 1 for s in rec.scores.values()),
        "images_analysed": len(rec.scores),
    }


def overflow_phase(url, category, image, max_queue, extra=8) -> dict:
    """max_queue + extra analyses submitted at once: the surplus must be refused quickly with a queue-full message."""
    from gradio_client import Client, handle_file

    outcomes, lock = [], threading.Lock()

    def one():
        t0 = time.perf_counter()
        try:
            Client(url, verbose=False, httpx_kwargs={"timeout": 900}).predict(handle_file(image), category, api_name="/analyse")
            result = ("served", time.perf_counter() - t0)
        except Exception as exc:
            result = ("refused" if "queue is full" in str(exc).lower() else f"failed: {exc}", time.perf_counter() - t0)
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(max_queue + extra)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [s for kind, s in outcomes if kind == "refused"]
    return {"queue_size": max_queue, "submitted": len(outcomes), "served": sum(k == "served" for k, _ in outcomes), "refused_queue_full": len(refused),
            "other_failures": [k for k, _ in outcomes if k.startswith("failed")][:3],
            "slowest_refusal_s": round(max(refused), 2) if refused else None}


CHILD = """
import sys, time
from gradio_client import Client, handle_file
job = Client(sys.argv[1], verbose=False).submit(handle_file(sys.argv[2]), sys.argv[3], 0.02, 5, 20, 0, api_name="/morph")
while len(job.outputs()) < 2:
    time.sleep(0.05)
print("streaming", flush=True)
time.sleep(600)
"""


def disconnect_phase(url, pid, category, image, log_path: Path) -> dict:
    """Kill a client mid-morph (20 loops requested) and watch the server's CPU time until it is idle again."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, image, category], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    child.kill()
    child.wait()
    killed, busy_until = time.perf_counter(), None
    last = cpu_seconds(pid)
    while time.perf_counter() - killed < 60:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last < 0.1:  # under 20% of one core over half a second: idle
            busy_until = time.perf_counter() - 0.5
            break
        last = now
    stopped = [line for line in log_path.read_text().splitlines() if "morph stopped after" in line]
    return {"server_busy_after_disconnect_s": round(busy_until - killed, 2) if busy_until else None,
            "server_log": stopped[-1].split(": ", 1)[-1] if stopped else None}


def main(argv=None):
    from benchmarks.app_server import running_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--min-requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=32)
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    manifest = json.loads((ROOT / "examples" / args.category / "manifest.json").read_text())
    images = [str(ROOT / "examples" / args.category / e["file"]) for e in manifest["images"]]
    workdir = Path(tempfile.mkdtemp(prefix="diffad-load-"))
    bad_file = workdir / "truncated.png"
    bad_file.write_bytes(truncated_png())
    log_path = workdir / "app.log"
    env = {"OMP_NUM_THREADS": str(args.threads)}
    with running_app("--max-queue", str(args.max_queue), env=env, log_path=log_path) as (url, process):
        Client(url, verbose=False).predict(handle_file(images[0]), args.category, api_name="/analyse")  # loads the model
        print("load phase ...", flush=True)
        load = load_phase(url, process.pid, args, images, str(bad_file))
        print(json.dumps(load, indent=1), flush=True)
        print("overflow phase ...", flush=True)
        overflow = overflow_phase(url, args.category, images[0], args.max_queue)
        print(overflow, flush=True)
        print("disconnect phase ...", flush=True)
        disconnect = disconnect_phase(url, process.pid, args.category, images[-1], log_path)
        print(disconnect, flush=True)
    result = {
        "threads": args.threads, "category": args.category, "load": load, "overflow": overflow, "disconnect": disconnect,
    }
    from benchmarks.run import save_section

    save_section("reliability", result)


def render(r: dict) -> list[str]:
    load, overflow, disconnect = r["load"], r["overflow"], r["disconnect"]
    memory = ", ".join(f"{n}: {m:.0f}" for n, m in load["rss_by_requests_mb"])
    out = [f"## Reliability ({r['threads']} CPU threads, `benchmarks/load_test.py`, {r['category']})", "",
           "Bad input (corrupt and huge files, every image mode, forged API calls) is covered case by case by "
           "`tests/test_bad_input.py` in CI.", "", f"### Load: {load['clients']} concurrent gradio_client clients for {load['duration_s']:.0f} s", "",
            f"- requests served: **{load['requests']}**, failed: **{load['failures']}** "
            f"(plus {load['refused_bad_uploads']} corrupt uploads refused with a clear message, as they should be)",
            f"- latency over all requests: p50 {load['p50_s']:.2f} s, p95 {load['p95_s']:.2f} s (queue wait included)", "",
            "| endpoint | requests | p50 (s) | p95 (s) |", "|---|---|---|---|"]
    out += [f"| {name} | {e['requests']} | {e['p50_s']:.2f} | {e['p95_s']:.2f} |" for name, e in load["per_endpoint"].items()]
    out += ["", f"- app process memory (RSS, MB) before the load: {load['rss_before_mb']:.0f}; after N requests: {memory}",
            f"- peak RSS: **{load['peak_rss_mb']:.0f} MB**; growth from request 200 to the end: {load['rss_growth_after_200_requests_mb']:.0f} MB",
            f"- repeated analyses of the same image under concurrency: {load['images_with_differing_scores']} of "
            f"{load['images_analysed']} images got differing scores",
            "", f"### Bounded queue: {overflow['submitted']} analyses submitted at once (queue size {overflow['queue_size']})", "",
            f"- served: {overflow['served']}, refused with \"queue is full\" instead of waiting: {overflow['refused_queue_full']} "
            f"(slowest refusal {overflow['slowest_refusal_s']} s, client start-up included), "
            f"other failures: {len(overflow['other_failures'])}",
            "", "### Client leaving mid-morph (20 loops requested, client process killed after the first frames)", "",
            f"- server CPU busy for {disconnect['server_busy_after_disconnect_s']} s after the disconnect, then idle; "
            f"app log: \"{disconnect['server_log']}\"", ""]
    return out


if __name__ == "__main__":
    main()
