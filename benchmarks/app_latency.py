"""App latency through gradio_client on localhost: cold start to the first served page, the first analysis (the
default category is loaded and warmed before the page is served, so it should cost what the next ones do), then
medians of analysis, timestep scrub, threshold and morph. Targets (issue 20): cold start <= 20 s, first analysis
<= 2 s on 2 threads.

    python benchmarks/app_latency.py [--category bottle] [--repeats 5]
    python benchmarks/app_latency.py --category magnetic_tile --photos TILE.jpg ...  # real photos, e.g. elongated ones

Starts `python app.py` on a free port (torch limited to --threads through CPU_CORES, as on a Space), offline on the
local checkpoints, and adds an "app" section to benchmarks/results.json / results.md ("app_photos" with --photos: a
category that scores photos in windows at their own aspect costs more per photo the longer it is).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--photos", nargs="+", metavar="FILE", help="photos to analyse and morph instead of the "
                        "category's examples")
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    from benchmarks.app_server import running_app

    from diffad.checkpoint import read_config
    from diffad.morph import MorphConfig

    defaults = MorphConfig()
    manifest = json.loads((ROOT / "examples" / args.category / "manifest.json").read_text())
    # A verdict threshold inside the slider's range (up to twice the calibrated one) that moves the verdict.
    config = read_config(ROOT / "checkpoints" / args.category / "config.json")
    image_threshold = round(1.5 * config["calibration"]["image_threshold"], 2)
    images = args.photos or [str(ROOT / "examples" / args.category / e["file"]) for e in manifest["images"]]
    start = time.perf_counter()
    env = {"OMP_NUM_THREADS": str(args.threads), "CPU_CORES": str(args.threads), "HF_HUB_OFFLINE": "1",
           "DIFFAD_HUB_REPO": ""}
    with running_app(env=env) as (url, _):
        cold_start = time.perf_counter() - start
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        client.predict(handle_file(images[0]), args.category, api_name="/analyse")
        first_analysis = time.perf_counter() - t0
        analyse, scrub, scrub_new, threshold, morph = [], [], [], [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            client.predict(handle_file(images[i % len(images)]), args.category, api_name="/analyse")
            analyse.append(time.perf_counter() - t0)
            # The slider is in diffusion timesteps. /analyse returns the scored ones (20, 200, 400); any other is
            # computed on its first visit.
            for t, times in ((50, scrub_new), (20, scrub), (150, scrub_new), (200, scrub), (300, scrub_new), (50, scrub)):
                t0 = time.perf_counter()
                client.predict(t, api_name="/timestep")
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.predict("Combined", 5.0, image_threshold, api_name="/threshold")
            threshold.append(time.perf_counter() - t0)
        for i in range(min(3, args.repeats)):
            t0 = time.perf_counter()
            client.predict(handle_file(images[-1 - i]), args.category, defaults.step_size, defaults.denoise_every,
                           defaults.max_loops, defaults.seed, api_name="/morph")
            morph.append(time.perf_counter() - t0)
    result = {
        "threads": args.threads, "category": args.category, "cold_start_to_first_page_s": round(cold_start, 2),
        "first_analysis_round_trip_s": round(first_analysis, 3),
        "analysis_round_trip_s": round(statistics.median(analyse), 3),
        "timestep_slider_round_trip_s": round(statistics.median(scrub), 3),
        "timestep_first_visit_round_trip_s": round(statistics.median(scrub_new), 3),
        "threshold_round_trip_s": round(statistics.median(threshold), 3),
        "morph_round_trip_s": round(statistics.median(morph), 2), "morph_max_loops": defaults.max_loops,
    }
    if args.photos:
        from PIL import Image

        result["photos"] = [f"{Path(p).name} ({'x'.join(map(str, Image.open(p).size))})" for p in args.photos]
    print(result)
    from benchmarks.run import save_section

    save_section("app_photos" if args.photos else "app", result)


def render(a: dict) -> list[str]:
    on = f" on real {a['category']} photos" if a.get("photos") else ""
    return [f"## Web app{on} ({a['threads']} CPU threads, `benchmarks/app_latency.py`, medians through gradio_client)", "",
            f"- cold start to first served page: {a['cold_start_to_first_page_s']:.1f} s",
            # Measured since the default category is warmed before serving (older results lack it).
            *([f"- first analysis after the start: {a['first_analysis_round_trip_s']:.2f} s"]
              if "first_analysis_round_trip_s" in a else []),
            *([f"- analysis round trip ({a['category']}, 12 timesteps for the slider): {a['analysis_round_trip_s']:.2f} s",
               f"- timestep slider round trip: {a['timestep_slider_round_trip_s'] * 1000:.0f} ms; threshold: "
               f"{a['threshold_round_trip_s'] * 1000:.0f} ms"] if "timestep_first_visit_round_trip_s" not in a else
              [f"- analysis round trip ({a['category']}; the verdict with the 3 scored timesteps' panels): "
               f"{a['analysis_round_trip_s']:.2f} s",
               f"- timestep slider round trip: {a['timestep_slider_round_trip_s'] * 1000:.0f} ms for a timestep already "
               f"there, {a['timestep_first_visit_round_trip_s'] * 1000:.0f} ms for one computed on its first visit; "
               f"threshold: {a['threshold_round_trip_s'] * 1000:.0f} ms"]),
            f"- morph round trip (the app's settings and the category's smoothing, timestep and stop, up to {a['morph_max_loops']} loops, "
            f"fewer when it stalls): {a['morph_round_trip_s']:.1f} s",
            *([f"- photos: {', '.join(a['photos'])}"] if a.get("photos") else []), ""]


if __name__ == "__main__":
    main()
