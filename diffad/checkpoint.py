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

from .calibration import Calibration
from .detector import AnomalyDetector
from .diffusion import GaussianDiffusion
from .models import DiffADNet, NetConfig
from .morph import check_morph_defaults
from .scoring import MAP_KINDS, ScoringConfig, pool_sizes

# Version 2: NetConfig.prediction. Version 3: the calibration holds the smoothing, the feature pooling and the
# morph's Gaussian, with typed statistics (`Calibration.to_config`); ScoringConfig.pixel_map is `pixel_kind`.
FORMAT_VERSION = 4
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
    "morph": (dict, False),
}


def _from_version_1(config: dict, tensors: dict | None) -> tuple[dict, dict | None]:
    # Version 1 networks all predicted the noise; the setting came with version 2.
    return {**config, "format_version": 2, "net": {"prediction": "eps", **config["net"]}}, tensors


def _from_version_2(config: dict, tensors: dict | None) -> tuple[dict, dict | None]:
    scoring, old = dict(config["scoring"]), dict(config["calibration"])
    scoring["pixel_kind"] = scoring.pop("pixel_map", "kl")
    used_pools = pool_sizes(scoring.pop("feature_pool", 1))
    stored_pool = old.get("feature_pool", 1)
    calibrated_pools = pool_sizes(stored_pool)
    # Written when one size was all there was, "feature" named the map of that size; later, the unpooled one.
    single = stored_pool if isinstance(stored_pool, int) else 1
    step_stats = {int(t): kinds for t, kinds in old.get("step_stats", {}).items()}
    timesteps = sorted(step_stats)

    def pool_of(kind: str) -> int:
        return int(kind.partition("@")[2] or single)

    def stats(select) -> dict:
        rows = [next(v for kind, v in step_stats[t].items() if select(kind)) for t in timesteps]
        return {"mean": [r[0] for r in rows], "std": [r[1] for r in rows]}

    calibration = {
        "timesteps": timesteps,
        "kl": stats(lambda kind: kind == "kl"), "rgb": stats(lambda kind: kind == "rgb"),
        "features": [{"pool": k, **stats(lambda kind, k=k: kind.startswith("feature") and pool_of(kind) == k)} for k in used_pools],
        "smoothing_sigma": float(scoring.pop("smoothing_sigma", 0.0)),
        "smoothing_trials": [{"sigma": float(sigma), **metrics} for sigma, metrics in old.get("smoothing_validation", {}).items()],
        "normal_scores": old.get("normal_scores", []),
        "image_threshold": old.get("image_threshold", float("inf")),
        "mask_threshold": old.get("pixel_threshold", float("inf")),
    }
    config = {**config, "format_version": 3, "scoring": scoring, "calibration": calibration}
    return config, None if tensors is None else _tensors_from_version_2(tensors, timesteps, calibrated_pools, used_pools)


def _tensors_from_version_2(tensors: dict, timesteps: list[int], calibrated_pools, used_pools) -> dict:
    """Version 2 stacked the position means as extras.position_mean (T, [kl, finest feature, rgb], R, R) and
    extras.position_mean_pooled (T, coarser features, r, r), rows in extras.position_mean_timesteps' order."""
    moved = {k: v for k, v in tensors.items() if not k.startswith("extras.")}
    for key in ("gaussian_mean", "gaussian_precision", "gaussian_dims"):
        if f"extras.{key}" in tensors:
            moved[f"calibration.{key}"] = tensors[f"extras.{key}"]
    full, pooled, rows = (tensors.get(f"extras.{k}") for k in ("position_mean", "position_mean_pooled", "position_mean_timesteps"))
    if full is None and rows is None:
        return moved
    if (full is None or rows is None or rows.dim() != 1 or sorted(rows.tolist()) != timesteps or full.dim() != 4
            or full.shape[:2] != (len(rows), 3) or (len(calibrated_pools) > 1 and (pooled is None or pooled.dim() != 4
                                                                               or pooled.shape[:2] != (len(rows), len(calibrated_pools) - 1)))):
        raise ValueError("the checkpoint's position-wise normal means have inconsistent shapes or values")
    order = [rows.tolist().index(t) for t in timesteps]
    maps = {"kl": full[:, 0], f"feature_{calibrated_pools[0]}": full[:, 1], "rgb": full[:, 2]}
    maps.update({f"feature_{k}": pooled[:, i] for i, k in enumerate(calibrated_pools[1:])})
    for name, value in maps.items():
        if name in ("kl", "rgb") or int(name.split("_")[1]) in used_pools:
            moved[f"calibration.position_mean.{name}"] = value[order].contiguous()
    return moved


def _from_version_3(config: dict, tensors: dict | None) -> tuple[dict, dict | None]:
    """Version 3's scoring.centre_by_position was one switch for every map; version 4 names the maps it centres."""
    scoring = dict(config.get("scoring", {}))
    scoring["centre_by_position"] = list(MAP_KINDS) if scoring.get("centre_by_position", True) else []
    return {**config, "format_version": 4, "scoring": scoring}, tensors


# Format version -> function upgrading a config.json of that version (and its tensors, when given) by one version.
MIGRATIONS = {1: _from_version_1, 2: _from_version_2, 3: _from_version_3}


class CheckpointError(ValueError):
    """A checkpoint that is missing, of another format, or damaged; the message names the file."""


def validate_category(name: str) -> str:
    if not isinstance(name, str) or not CATEGORY_PATTERN.match(name) or ".." in name:
        raise CheckpointError(f"invalid category name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def save_checkpoint(detector: AnomalyDetector, folder) -> Path:
    """Write config.json and model.safetensors (network in fp16, statistics in fp32, calibration as it is held)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in detector.net.state_dict().items()}
    tensors["feature_mean"] = detector.feature_mean.detach().cpu().float().contiguous()
    tensors["feature_std"] = detector.feature_std.detach().cpu().float().contiguous()
    tensors.update({f"calibration.{k}": v for k, v in detector.calibration.to_tensors().items()})
    config = {
        "format_version": FORMAT_VERSION,
        "category": detector.category,
        "backbone": detector.backbone_name,
        "diffusion": {"num_train_timesteps": detector.diffusion.num_timesteps, "beta_schedule": detector.diffusion.beta_schedule},
        "net": detector.net.config.to_dict(),
        "scoring": detector.scoring.to_dict(),
        "calibration": detector.calibration.to_config(),
        "training": detector.training,
        **({"morph": detector.morph_defaults} if detector.morph_defaults else {}),
    }
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read_config(path: Path) -> dict:
    """config.json as written, its top level checked; not yet migrated."""
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
    validate_category(config["category"])
    return config


def migrate(config: dict, tensors: dict | None = None) -> tuple[dict, dict | None]:
    """A checkpoint's config (and tensors) upgraded to FORMAT_VERSION, one version at a time."""
    while config["format_version"] != FORMAT_VERSION:
        config, tensors = MIGRATIONS[config["format_version"]](config, tensors)
    return config, tensors


def read_config(path: Path) -> dict:
    """A checkpoint's config.json, checked and upgraded to the current format."""
    config = _read_config(path)
    try:
        return migrate(config)[0]
    except (TypeError, ValueError, KeyError, StopIteration) as exc:
        raise CheckpointError(f"{path}: invalid settings ({exc})") from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from exc


def _network(config: dict, diffusion: GaussianDiffusion, tensors: dict, weights_path: Path) -> DiffADNet:
    """The network of a (migrated) config with its weights, every tensor's shape and type checked."""
    net = DiffADNet(NetConfig.from_dict(config["net"]), diffusion.alphas_cumprod)
    state = {}
    for key, ref in net.state_dict().items():
        value = tensors.get(f"net.{key}")
        if value is None:
            raise CheckpointError(f"{weights_path}: tensor net.{key} is missing")
        if value.shape != ref.shape or not value.is_floating_point():
            raise CheckpointError(
                f"{weights_path}: tensor net.{key} is {value.dtype} {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
        state[key] = value.to(ref.dtype)
    net.load_state_dict(state)
    return net


def load_folder(folder, device: str | torch.device = "cpu") -> AnomalyDetector:
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = _read_config(config_path)
    tensors = _load_tensors(weights_path)
    try:
        config, tensors = migrate(config, tensors)
        diffusion = GaussianDiffusion(**config["diffusion"])
        net = _network(config, diffusion, tensors, weights_path)
        scoring = ScoringConfig.from_dict(config["scoring"])
        prefix = "calibration."
        calibration = Calibration.from_checkpoint(
            config["calibration"], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, net.config.resolution
        )
        morph_defaults = check_morph_defaults(config.get("morph", {}), diffusion.num_timesteps)
    except (TypeError, ValueError, KeyError, StopIteration) as exc:
        raise CheckpointError(f"{config_path}: invalid settings ({exc})") from exc
    channels = net.config.feature_channels
    stats = {}
    for key in ("feature_mean", "feature_std"):
        value = tensors.get(key)
        if value is None or value.shape != (channels,):
            raise CheckpointError(f"{weights_path}: tensor {key} is missing or not of shape ({channels},)")
        stats[key] = value.float()
    detector = AnomalyDetector(net, category=config["category"], scoring=scoring, calibration=calibration,
                               backbone=config["backbone"], diffusion=diffusion,
                               training=config.get("training", {}), morph_defaults=morph_defaults, **stats)
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
