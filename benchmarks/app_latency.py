"""App latency through gradio_client on localhost: cold start, analysis, timestep scrub, threshold, morph.

    python benchmarks/app_latency.py [--category bottle] [--repeats 5]

Starts `python app.py` on a free port (torch limited to --threads), measures medians and adds an "app" section to
benchmarks/results.json / results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_app import free_port, wait_for  # noqa: E402  (the same launch helpers the app tests use)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    manifest = json.loads((ROOT / "examples" / args.category / "manifest.json").read_text())
    images = [str(ROOT / "examples" / args.category / e["file"]) for e in manifest["images"]]
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GRADIO_ANALYTICS_ENABLED="False")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process, timeout=300)
        cold_start = time.perf_counter() - start
        client = Client(url, verbose=False)
        client.predict(handle_file(images[0]), args.category, api_name="/analyse")  # loads the model
        analyse, scrub, threshold, morph = [], [], [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            client.predict(handle_file(images[i % len(images)]), args.category, api_name="/analyse")
            analyse.append(time.perf_counter() - t0)
            for index in (2, 6, 10):
                t0 = time.perf_counter()
                client.predict(index, api_name="/timestep")
                scrub.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.predict("Combined", 5.0, 20.0, api_name="/threshold")
            threshold.append(time.perf_counter() - t0)
        for i in range(min(3, args.repeats)):
            t0 = time.perf_counter()
            client.predict(handle_file(images[-1 - i]), args.category, 0.02, 5, 8, 0, api_name="/morph")
            morph.append(time.perf_counter() - t0)
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = {
        "threads": args.threads, "category": args.category, "cold_start_to_first_page_s": round(cold_start, 2),
        "analysis_round_trip_s": round(statistics.median(analyse), 3),
        "timestep_slider_round_trip_s": round(statistics.median(scrub), 3),
        "threshold_round_trip_s": round(statistics.median(threshold), 3),
        "morph_round_trip_s": round(statistics.median(morph), 2),
    }
    print(result)
    results_path = ROOT / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"categories": {}}
    results["app"] = result
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    from benchmarks.run import markdown

    (ROOT / "benchmarks" / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
