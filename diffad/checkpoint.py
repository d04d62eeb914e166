"""Checkpoints: one folder per category holding config.json and model.safetensors, locally or on the Hub.

Only JSON and safetensors are ever read: nothing is unpickled, so a downloaded checkpoint cannot run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .detector import FORMAT_VERSION, AnomalyDetector, Calibration
from .diffusion import GaussianDiffusion
from .models import DiffADNet, NetConfig
from .scoring import ScoringConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_REPO_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
CATEGORY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Key -> (type, required) of config.json's top level.
CONFIG_SCHEMA = {
    "format_version": (int, True),
    "category": (str, True),
    "backbone": (str, True),
    "diffusion": (dict, True),
    "net": (dict, True),
    "scoring": (dict, True),
    "calibration": (dict, True),
    "training": (dict, False),
}


def _from_version_1(config: dict) -> dict:
    # Version 1 networks all predicted the noise; the setting came with version 2.
    return {**config, "format_version": 2, "net": {"prediction": "eps", **config["net"]}}


# Format version -> function upgrading a config.json of that version by one version.
MIGRATIONS = {1: _from_version_1}


class CheckpointError(ValueError):
    """A checkpoint that is missing, of another format, or damaged; the message names the file."""


def validate_category(name: str) -> str:
    if not isinstance(name, str) or not CATEGORY_PATTERN.match(name) or ".." in name:
        raise CheckpointError(f"invalid category name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def save_checkpoint(detector: AnomalyDetector, folder, extra_tensors: dict | None = None) -> Path:
    """Write config.json and model.safetensors (network in fp16, statistics in fp32)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in detector.net.state_dict().items()}
    tensors["feature_mean"] = detector.feature_mean.detach().cpu().float().contiguous()
    tensors["feature_std"] = detector.feature_std.detach().cpu().float().contiguous()
    for key, value in {**detector.extra_tensors, **(extra_tensors or {})}.items():
        tensors[f"extras.{key}"] = value.detach().cpu().contiguous()
    config = detector.config_dict()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key, (kind, required) in CONFIG_SCHEMA.items():
        if key not in config:
            if required:
                raise CheckpointError(f"{path}: missing key {key!r}")
            continue
        if not isinstance(config[key], kind):
            raise CheckpointError(f"{path}: {key!r} must be a {kind.__name__}")
    if config["format_version"] not in MIGRATIONS and config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {config['format_version']} is not supported (this diffad reads {FORMAT_VERSION})"
        )
    while config["format_version"] != FORMAT_VERSION:
        config = MIGRATIONS[config["format_version"]](config)
    validate_category(config["category"])
    return config


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from exc


def load_folder(folder, device: str | torch.device = "cpu") -> AnomalyDetector:
    folder = Path(folder)
    config = read_config(folder / CONFIG_NAME)
    tensors = _load_tensors(folder / WEIGHTS_NAME)
    weights_path = folder / WEIGHTS_NAME
    try:
        diffusion = GaussianDiffusion(**config["diffusion"])
        net = DiffADNet(NetConfig.from_dict(config["net"]), diffusion.alphas_cumprod)
        scoring = ScoringConfig.from_dict(config["scoring"])
        calibration = Calibration.from_dict(config["calibration"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME}: invalid settings ({exc})") from exc
    expected = net.state_dict()
    state = {}
    for key, ref in expected.items():
        value = tensors.get(f"net.{key}")
        if value is None:
            raise CheckpointError(f"{weights_path}: tensor net.{key} is missing")
        if value.shape != ref.shape or not value.is_floating_point():
            raise CheckpointError(
                f"{weights_path}: tensor net.{key} is {value.dtype} {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
        state[key] = value.to(ref.dtype)
    net.load_state_dict(state)
    channels = net.config.feature_channels
    stats = {}
    for key in ("feature_mean", "feature_std"):
        value = tensors.get(key)
        if value is None or value.shape != (channels,):
            raise CheckpointError(f"{weights_path}: tensor {key} is missing or not of shape ({channels},)")
        stats[key] = value.float()
    extras = {k[len("extras."):]: v for k, v in tensors.items() if k.startswith("extras.")}
    detector = AnomalyDetector(
        net,
        category=config["category"],
        scoring=scoring,
        calibration=calibration,
        backbone=config["backbone"],
        diffusion=diffusion,
        training=config.get("training", {}),
        extra_tensors=extras,
        **stats,
    )
    try:
        detector.check_calibrated_for(scoring)
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {exc}") from exc
    try:
        detector.position_means()
    except ValueError as exc:
        raise CheckpointError(f"{weights_path}: {exc}") from exc
    return detector.to(device)


def _download(repo_id: str, category: str, revision: str | None, cache_dir, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        paths = [
            hf_hub_download(
                repo_id, name, subfolder=category, revision=revision, cache_dir=cache_dir, etag_timeout=10,
                local_files_only=local_files_only,
            )
            for name in (CONFIG_NAME, WEIGHTS_NAME)
        ]
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id}/{category} is not in the local Hub cache and the Hub cannot be reached (offline?)"
        ) from exc
    except EntryNotFoundError as exc:
        raise CheckpointError(f"category {category!r} is not in the Hub repo {repo_id}") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hub repo {repo_id} not found (or private)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"cannot download {repo_id}/{category}: {exc}") from exc
    return Path(paths[0]).parent


def load_checkpoint(
    path_or_repo_id,
    category: str | None = None,
    revision: str | None = None,
    cache_dir=None,
    device="cpu",
    local_files_only: bool = False,
) -> AnomalyDetector:
    """Load a category from a local folder (the category folder, or a parent with `category/`) or a Hub repo.

    A Hub repo keeps one subfolder per category; `revision` pins a branch, tag or commit. Downloads are cached by
    huggingface_hub, and HF_HUB_OFFLINE=1 reads the cache only.
    """
    if category is not None:
        validate_category(category)
    local = Path(path_or_repo_id)
    if local.is_dir():
        if (local / CONFIG_NAME).exists() and category in (None, local.name):
            return load_folder(local, device)
        if category is None:
            raise CheckpointError(f"{local} has no {CONFIG_NAME}; name a category inside it")
        if not (local / category).is_dir():
            available = ", ".join(list_local_categories(local)) or "none"
            raise CheckpointError(f"unknown category {category!r} in {local} (available: {available})")
        return load_folder(local / category, device)
    if not HUB_REPO_PATTERN.match(str(path_or_repo_id)):  # looks like a path, not "owner/name"
        raise CheckpointError(f"checkpoint folder {path_or_repo_id} does not exist")
    if category is None:
        raise CheckpointError(f"loading from the Hub repo {path_or_repo_id} needs a category")
    return load_folder(_download(str(path_or_repo_id), category, revision, cache_dir, local_files_only), device)


def list_local_categories(root) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file() and CATEGORY_PATTERN.match(p.name))
