"""Publishing checkpoints to a Hugging Face Hub model repo.

Layout: one model repo with a subfolder per category (what `load_checkpoint(repo, category=...)`, the app and a
Space's `preload_from_hub` read), and one model card at the root: the Hub renders and parses only the root README.md,
so that card carries the licence, library, tags, paper and every category's metrics (as model-index eval results).
One repo keeps one revision pin, one `preload_from_hub` line and one listing for all categories.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from .calibration import IMAGE_THRESHOLD_QUANTILE
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, list_local_categories, read_config

PAPER_TITLE = "Removing Anomalies as Noises for Industrial Defect Localization"
PAPER_URL = ("https://openaccess.thecvf.com/content/ICCV2023/html/"
             "Lu_Removing_Anomalies_as_Noises_for_Industrial_Defect_Localization_ICCV_2023_paper.html")
TAGS = ["anomaly-detection", "defect-detection", "diffusion", "industrial-inspection", "diffad"]
# What a category folder uploads (ood.safetensors: the app's "looks like the category?" note; never the resumable
# train_state.pt, which is pickled).
CATEGORY_FILES = (CONFIG_NAME, WEIGHTS_NAME, "ood.safetensors", "metrics.json", "metrics.md", "train_log.csv")
# metrics.json key -> (model-index task type, metric type, display name). Image-level figures judge detection,
# pixel-level ones localisation.
EVAL_METRICS = {
    "image_auroc": ("image-classification", "roc_auc", "image AUROC"),
    "image_f1_max": ("image-classification", "f1", "image F1-max"),
    "pixel_auroc": ("image-segmentation", "roc_auc", "pixel AUROC"),
    "aupro": ("image-segmentation", "aupro", "AUPRO@0.3"),
    "pixel_f1_max": ("image-segmentation", "f1", "pixel F1-max"),
}
TASK_NAMES = {"image-classification": "Anomaly detection (image level)",
              "image-segmentation": "Defect localisation (pixel level)"}
SECTION = re.compile(r"<!-- diffad:category (\S+) -->\n.*?<!-- diffad:end -->\n", re.S)


def category_folders(checkpoint) -> list[Path]:
    """The category folders to publish: `checkpoint` itself, or every category inside it."""
    folder = Path(checkpoint)
    if (folder / CONFIG_NAME).is_file():
        return [folder]
    categories = list_local_categories(folder)
    if not categories:
        raise CheckpointError(f"{folder}: neither a category folder (no {CONFIG_NAME}) nor a folder of categories")
    return [folder / name for name in categories]


def calibrated_pools(config: dict) -> list[int]:
    """The feature pooling sizes a checkpoint's config is calibrated with."""
    return [entry["pool"] for entry in config.get("calibration", {}).get("features", [])] or [1]


def training_command(config: dict) -> str:
    """The commands that made a checkpoint as it is: its `diffad train` run (and the network it started from), then
    `diffad calibrate` with the feature pooling, scoring and smoothing it is calibrated with now, and its morph settings."""
    from .scoring import ScoringConfig

    t = config.get("training", {})
    if not t:
        return ""
    out, data = f"checkpoints/{config['category']}", t.get("data", "DATA")
    args = ["diffad", "train", "--data", data, "--out", out]
    # The steps it ran: a run stopped by --time-limit records a larger target in "steps".
    values = {**t, "steps": t.get("steps_done", t.get("steps"))}
    for flag, key in (("--resolution", "resolution"), ("--steps", "steps"), ("--batch-size", "batch_size"),
                      ("--lr", "lr"), ("--augment", "augment"), ("--seed", "seed"), ("--device", "device"),
                      ("--precision", "precision")):
        if values.get(key) is not None and (key, values[key]) not in (("device", "cpu"), ("precision", "fp32")):
            args += [flag, str(values[key])]
    for flag, key in (("--net", "net"), ("--scoring", "scoring")):
        if t.get(key):
            args += [flag, json.dumps(t[key])]
    lines = [f"# --init-from {t['init_from']}"] if t.get("init_from") else []
    lines.append(shlex.join(args))
    calibration = config.get("calibration", {})
    defaults = ScoringConfig().to_dict()
    scoring = {k: v for k, v in config.get("scoring", {}).items() if k not in defaults or defaults[k] != v}
    pools = calibrated_pools(config)
    calibrate = ["diffad", "calibrate", "--checkpoint", out, "--data", data]
    if pools != [1]:
        calibrate += ["--feature-pool", ",".join(map(str, pools))]
    if scoring:
        calibrate += ["--scoring", json.dumps(scoring)]
    if calibration.get("smoothing_sigma") is not None:
        calibrate += ["--smoothing", str(calibration["smoothing_sigma"])]
    if calibration.get("threshold_quantile", IMAGE_THRESHOLD_QUANTILE) != IMAGE_THRESHOLD_QUANTILE:
        calibrate += ["--threshold-quantile", str(calibration["threshold_quantile"])]
    if config.get("morph"):
        calibrate += ["--morph", json.dumps(config["morph"])]
    lines.append(shlex.join(calibrate))
    return "\n".join(lines)


def read_metrics(folder: Path) -> dict | None:
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("overall"), dict):
        raise CheckpointError(f"{path}: expected the output of `diffad evaluate --out` (an 'overall' entry)")
    return metrics


def dataset_id(config: dict, dataset: str | None) -> str:
    """The dataset named in eval results: `dataset` when given, else the training data's collection folder."""
    if dataset:
        return dataset
    data = Path(config.get("training", {}).get("data", "") or "unknown")
    # MVTec layout .../mvtec_ad/bottle: the collection is the parent; a plain folder names itself.
    return data.parent.name if data.name == config["category"] and data.parent.name else data.name


def eval_results(config: dict, metrics: dict, dataset: str | None):
    from huggingface_hub import EvalResult

    category, dataset_type = config["category"], dataset_id(config, dataset)
    results = []
    for key, (task, metric_type, name) in EVAL_METRICS.items():
        value = metrics["overall"].get(key)
        if value is None or value != value:  # missing or NaN (no defective images)
            continue
        results.append(EvalResult(
            task_type=task, task_name=TASK_NAMES[task], dataset_type=dataset_type,
            dataset_name=f"{dataset_type} ({category})", dataset_config=category, dataset_split="test",
            metric_type=metric_type, metric_name=name, metric_value=round(float(value), 4),
        ))
    return results


def category_section(folder: Path, config: dict, metrics: dict | None) -> str:
    category = config["category"]
    t = config.get("training", {})
    lines = [
        f"<!-- diffad:category {category} -->",
        f"## `{category}`",
        "",
        f"- Resolution {config['net']['resolution']} px, scoring timesteps {config['scoring']['timesteps']}, "
        f"feature pooling {calibrated_pools(config)}, "
        f"backbone `{config['backbone']}`."
        + (" Photos are scored in overlapping square windows at their own aspect."
           if config["scoring"].get("aspect") == "windows" else ""),
        f"- Trained {t.get('steps_done', '?')} steps at batch {t.get('batch_size', '?')} on {t.get('device', '?')}"
        + (f" ({t['seconds'] / 60:.0f} min)" if t.get("seconds") else "")
        + (f", {t['train_images']} training images" if t.get("train_images") else "") + ".",
        f"- Verdict threshold {config['calibration']['image_threshold']:.3f} (the "
        f"{config['calibration'].get('threshold_quantile', IMAGE_THRESHOLD_QUANTILE)} quantile "
        "of held-out normal images' scores).",
    ]
    command = training_command(config)
    if command:
        lines += ["", "Made with:", "", "```bash", command, "```"]
    lines += [""]
    if metrics is not None:
        lines += ["`diffad evaluate` on the test split:", "", (folder / "metrics.md").read_text().strip()
                  if (folder / "metrics.md").is_file() else json.dumps(metrics["overall"]), ""]
    else:
        lines += ["No metrics yet: `diffad evaluate --checkpoint CHECKPOINT --data DATA --out CHECKPOINT` adds them.", ""]
    lines += ["<!-- diffad:end -->", ""]
    return "\n".join(lines)


def model_card(folders, repo_id: str, licence: str, data_note: str, dataset: str | None = None, existing=None):
    """The root ModelCard for `folders` (category folders); sections and eval results of other categories already in
    `existing` (the repo's current card) are kept."""
    from huggingface_hub import ModelCard, ModelCardData

    configs = {Path(f): read_config(Path(f) / CONFIG_NAME) for f in folders}
    pushed = {c["category"] for c in configs.values()}
    sections, results, datasets = {}, [], set([dataset] if dataset else [])
    if existing is not None:
        for match in SECTION.finditer(existing.text):
            if match.group(1) not in pushed:
                sections[match.group(1)] = match.group(0)
        results += [r for r in (existing.data.eval_results or []) if r.dataset_config not in pushed]
        datasets |= set(existing.data.datasets or [])
    for folder, config in configs.items():
        metrics = read_metrics(folder)
        sections[config["category"]] = category_section(folder, config, metrics)
        if metrics is not None:
            results += eval_results(config, metrics, dataset)
    first = sorted(sections)[0]
    data = ModelCardData(
        license=licence, library_name="diffad", tags=TAGS, datasets=sorted(datasets) or None,
        model_name=repo_id.split("/")[-1], eval_results=results or None,
    )
    body = f"""
# diffad checkpoints: {", ".join(sorted(sections))}

Denoising diffusion models with learned variance and a feature-reconstruction head, each trained on defect-free
images of one product only, for [*{PAPER_TITLE}*]({PAPER_URL}) (Lu et al., ICCV 2023) as implemented by
diffad. A photo is noised a little and denoised; where the model's reverse step
disagrees with the true one (per-pixel KL) or cannot reconstruct pretrained features, there is a defect.

One subfolder per category, each holding `config.json` (JSON settings and calibration) and `model.safetensors`
(never pickle).

## Use

```python
import diffad

detector = diffad.load_checkpoint("{repo_id}", category="{first}")  # revision="..." pins a commit
prediction = detector.predict("photo.png")
print(prediction.score, prediction.verdict)
```

The web demo: `DIFFAD_HUB_REPO={repo_id} python app.py` (from the diffad repository).

{"".join(sections[name] for name in sorted(sections))}
## Data and licence

{data_note}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _existing_card(api, repo_id: str, revision: str | None):
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return ModelCard.load(api.hf_hub_download(repo_id, "README.md", revision=revision))
    except EntryNotFoundError:  # a new repo: no card yet
        return None


def push(checkpoint, repo_id: str, licence: str = "cc-by-nc-sa-4.0", data_note: str = "", revision: str | None = None,
         private: bool = False, dataset: str | None = None, token: str | None = None) -> str:
    """Upload one category folder, or every category of a folder, to `repo_id/<category>/` with the root model card,
    in one commit; `revision` names a branch, created from the default branch when missing."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folders = category_folders(checkpoint)
    categories = {folder: read_config(folder / CONFIG_NAME)["category"] for folder in folders}
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card = model_card(folders, repo_id, licence, data_note or "See the training data's own licence.", dataset,
                      existing=_existing_card(api, repo_id, revision))
    operations = [CommitOperationAdd("README.md", str(card).encode())]
    for folder, category in categories.items():
        operations += [CommitOperationAdd(f"{category}/{name}", str(folder / name))
                       for name in CATEGORY_FILES if (folder / name).is_file()]
    commit = api.create_commit(repo_id, operations, commit_message=f"diffad: upload {', '.join(categories.values())}",
                               revision=revision)
    return commit.commit_url
