"""Which categories exist and loading them: the configured Hub repo first, local checkpoints as the fallback."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    list_local_categories,
    load_checkpoint,
    validate_category,
)
from .detector import AnomalyDetector
from .ood import FILE_NAME as OOD_FILE
from .ood import FeatureDistance

log = logging.getLogger(__name__)
# Listing the Hub repo at start-up must not hang the app on a network that drops packets.
HUB_TIMEOUT_S = 15.0


class CheckpointRegistry:
    """Lists categories and keeps at most `max_loaded` detectors in memory (least recently used goes first)."""

    def __init__(self, local_root="checkpoints", hub_repo: str | None = None, revision: str | None = None,
                 max_loaded: int = 3, cache_dir=None, hub_timeout: float = HUB_TIMEOUT_S):
        self.local_root = Path(local_root)
        self.hub_repo = hub_repo or None
        self.revision = revision or None
        self.cache_dir = cache_dir
        self.max_loaded = max(1, max_loaded)
        self.hub_timeout = hub_timeout
        # Set once the Hub could not be listed: loads then read its local cache only instead of waiting on the network.
        self.hub_offline = False
        self._loaded: OrderedDict[str, tuple[AnomalyDetector, str]] = OrderedDict()
        self._lock = threading.Lock()  # guards _loaded and _loading, never held during a load
        self._loading: dict[str, threading.Lock] = {}
        self._feature_distances: dict[str, FeatureDistance | None] = {}
        self._hub_categories: list[str] | None = None
        self.hub_note = ""
        # A GPU is used automatically when there is one (a GPU Space, a workstation).
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def hub_categories(self) -> list[str]:
        """Category subfolders of the Hub repo; empty (with a note) when it is not configured or unreachable."""
        if self._hub_categories is not None:
            return self._hub_categories
        self._hub_categories = []
        if not self.hub_repo:
            self.hub_note = "No Hub repo configured: using the local checkpoints/ folder."
            return []
        try:
            entries = self._list_hub_repo()
            self._hub_categories = sorted(e.path for e in entries if "/" not in e.path and "." not in e.path)
            self.hub_note = f"Checkpoints from the Hub repo {self.hub_repo}."
        except Exception as exc:  # any network or Hub failure means: work offline
            log.warning("Hub repo %s unreachable: %r", self.hub_repo, exc)
            self.hub_offline = True
            self._hub_categories = self._cached_hub_categories()
            if self._hub_categories:
                self.hub_note = (f"The Hub repo {self.hub_repo} could not be reached (offline?): using its local cache "
                                 f"({', '.join(self._hub_categories)}) and the local checkpoints/ folder.")
            else:
                self.hub_note = f"The Hub repo {self.hub_repo} could not be reached (offline?): using local checkpoints/ instead."
        return self._hub_categories

    def _list_hub_repo(self) -> list:
        """The repo's top-level entries, or TimeoutError after hub_timeout seconds (a daemon thread is left behind)."""
        from huggingface_hub import HfApi

        result: dict = {}

        def listing():
            try:
                result["entries"] = list(HfApi().list_repo_tree(self.hub_repo, revision=self.revision))
            except Exception as exc:  # re-raised in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=listing, daemon=True, name="hub-listing")
        thread.start()
        thread.join(self.hub_timeout)
        if thread.is_alive():
            raise TimeoutError(f"no answer from the Hub within {self.hub_timeout:g} s")
        if "error" in result:
            raise result["error"]
        return result["entries"]

    def _cached_hub_categories(self) -> list[str]:
        """Categories of the Hub repo that huggingface_hub's cache already holds (for offline use)."""
        from huggingface_hub import snapshot_download

        try:
            snapshot = Path(snapshot_download(self.hub_repo, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True))
        except Exception:  # nothing cached
            return []
        return list_local_categories(snapshot)

    def categories(self) -> list[str]:
        return sorted(set(self.hub_categories()) | set(list_local_categories(self.local_root)))

    def get(self, category: str) -> tuple[AnomalyDetector, str]:
        """(detector, where it came from). Raises CheckpointError for unknown or broken categories.

        One lock per category while it loads: a slow Hub download blocks only requests for that category."""
        validate_category(category)
        with self._lock:
            if category in self._loaded:
                self._loaded.move_to_end(category)
                return self._loaded[category]
            loading = self._loading.setdefault(category, threading.Lock())
        with loading:
            with self._lock:
                if category in self._loaded:  # loaded by another request while this one waited
                    return self._loaded[category]
            loaded = self._load(category)
            with self._lock:
                self._loaded[category] = loaded
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            return loaded

    def feature_distance(self, category: str) -> FeatureDistance | None:
        """The category's 'does this look like it at all?' statistic (diffad.ood), or None where it was never made."""
        if category not in self._feature_distances:
            self._feature_distances[category] = self._load_feature_distance(category)
        return self._feature_distances[category]

    def _load_feature_distance(self, category: str) -> FeatureDistance | None:
        validate_category(category)
        candidates = [self.local_root / category / OOD_FILE]
        if self.hub_repo:
            try:
                from huggingface_hub import hf_hub_download

                candidates.insert(0, Path(hf_hub_download(self.hub_repo, f"{category}/{OOD_FILE}", revision=self.revision,
                                                          cache_dir=self.cache_dir, local_files_only=self.hub_offline)))
            except Exception:  # not published, or offline and not cached: the local file or none
                pass
        for path in candidates:
            if path.is_file():
                try:
                    return FeatureDistance.load(path)
                except (OSError, ValueError) as exc:
                    log.warning("ignoring %s: %s", path, exc)
        return None

    def _load(self, category: str) -> tuple[AnomalyDetector, str]:
        hub_error = None
        if self.hub_repo:
            try:
                detector = load_checkpoint(self.hub_repo, category=category, revision=self.revision, cache_dir=self.cache_dir,
                                           device=self.device, local_files_only=self.hub_offline)
                return detector, f"Hub: {self.hub_repo}/{category}" + (f" @ {self.revision}" if self.revision else "")
            except CheckpointError as exc:
                hub_error = str(exc)
        if category not in list_local_categories(self.local_root):
            known = ", ".join(self.categories()) or "none"
            raise CheckpointError(f"unknown category {category!r} (available: {known})" + (f"; Hub: {hub_error}" if hub_error else ""))
        detector = load_checkpoint(self.local_root / category, device=self.device)
        # The folder's name only: the page and the API never show server paths.
        note = f"local: {self.local_root.name}/{category}"
        if hub_error:
            note += f" (Hub unavailable: {hub_error})"
        return detector, note
