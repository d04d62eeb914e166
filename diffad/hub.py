"""Publishing a category checkpoint to a Hugging Face Hub model repo (one subfolder per category)."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config
from .calibration import IMAGE_THRESHOLD_QUANTILE

CARD_TEMPLATE = """---
library_name: diffad
license: {licence}
tags: [anomaly-detection, defect-detection, diffusion, industrial-inspection]
---
# diffad checkpoint: {category}

A learned-variance diffusion model with a feature-reconstruction head, trained on defect-free images of
**{category}** only, for the method of *Removing Anomalies as Noises for Industrial Defect Localization*
(Lu et al., ICCV 2023) as implemented by diffad.

- Resolution {resolution} px, scoring timesteps {timesteps}, backbone `{backbone}`.
- Training: {training}.
- Calibration: verdict threshold {threshold:.3f} (the {quantile} quantile of held-out normal scores).

## Metrics
{metrics}

## Use
```python
import diffad
detector = diffad.load_checkpoint("{repo_id}", category="{category}")
print(detector.predict("photo.png").verdict)
```

## Data and licence
{data_note}
"""


def model_card(folder: Path, repo_id: str, licence: str, data_note: str) -> str:
    config = read_config(folder / CONFIG_NAME)
    t = config.get("training", {})
    metrics_path = folder / "metrics.md"
    metrics = metrics_path.read_text() if metrics_path.exists() else "Run `diffad evaluate --out` to add metrics."
    return CARD_TEMPLATE.format(
        licence=licence, category=config["category"], resolution=config["net"]["resolution"],
        timesteps=config["scoring"]["timesteps"], backbone=config["backbone"],
        training=f"{t.get('steps_done')} steps of batch {t.get('batch_size')} on {t.get('device')}",
        threshold=config["calibration"]["image_threshold"], quantile=IMAGE_THRESHOLD_QUANTILE, metrics=metrics, repo_id=repo_id,
        data_note=data_note,
    )


def push(folder, repo_id: str, licence: str = "cc-by-nc-sa-4.0", data_note: str = "", revision: str | None = None,
         private: bool = False) -> str:
    """Upload config.json, model.safetensors (and ood.safetensors, metrics.md) to `repo_id/<category>/`, with a model card."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    config = read_config(folder / CONFIG_NAME)
    category = config["category"]
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    card = model_card(folder, repo_id, licence, data_note or "See the training data's own licence.")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo=f"{category}/README.md", repo_id=repo_id, revision=revision)
    commit = api.upload_folder(
        folder_path=str(folder), path_in_repo=category, repo_id=repo_id, revision=revision,
        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "ood.safetensors", "metrics.md", "metrics.json", "train_log.csv"],
        commit_message=f"diffad: upload {category}",
    )
    return str(getattr(commit, "commit_url", commit))


