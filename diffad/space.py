"""Assembling a Hugging Face Space from this repository, and reading back which Hub checkpoints a Space preloads.

A Space gets the app, the diffad package, the example images, the run-time requirements and a README whose front
matter configures it. Checkpoints come from a Hub model repo through `preload_from_hub` at a pinned commit (the
builder downloads them into the Space's Hub cache, so the app starts without downloading); without a model repo the
local checkpoints are copied in instead. Binaries are uploaded by `upload_folder`, which stores them with Xet/LFS, and
the folder's .gitattributes marks them for LFS for anyone who pushes it with git.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, list_local_categories
from .hub import PAPER_TITLE, PAPER_URL

ROOT = Path(__file__).resolve().parents[1]
# The app and the modules next to it that it imports (photo_input.pyi: Gradio would otherwise write it at start).
SPACE_FILES = ("app.py", "photo_input.py", "photo_input.pyi", "requirements.txt")
# The Hub refuses files over 10 MB and binary files that are not stored with Xet/LFS.
HUB_TEXT_LIMIT = 10 * 1024 * 1024
LFS_PATTERNS = ("*.safetensors", "*.png", "*.gif", "*.jpg", "*.jpeg", "*.webp", "*.mp4")
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME)
SPACE_BODY = """
# {title}

Upload a photo of a product (or click an example), see whether it has a defect, where, and why: a denoising diffusion
model trained on defect-free images only ({paper}, Lu et al., ICCV 2023). Checkpoints: {checkpoints}.

Built with `diffad space` from the diffad repository, which has the code, training commands and results.
"""


def preload_entry(model_repo: str, categories, revision: str) -> str:
    """A `preload_from_hub` line: the categories' checkpoint files of `model_repo` at commit `revision`."""
    files = ",".join(f"{category}/{name}" for category in categories for name in CHECKPOINT_FILES)
    return f"{model_repo} {files} {revision}"


def hub_source(readme) -> tuple[str, str | None] | None:
    """(repo, revision) of the first `preload_from_hub` entry in a README's front matter, or None.

    The app loads the revision the builder preloaded, so a Space reads its checkpoints from the Hub cache.
    """
    from huggingface_hub import metadata_load

    readme = Path(readme)
    if not readme.is_file():
        return None
    entries = (metadata_load(readme) or {}).get("preload_from_hub") or []
    if not entries:
        return None
    parts = str(entries[0]).split()
    return parts[0], (parts[2] if len(parts) > 2 else None)


def _copy_tree(source: Path, target: Path, patterns=("*",)) -> None:
    for path in sorted(p for pattern in patterns for p in source.rglob(pattern)):
        if path.is_file() and "__pycache__" not in path.parts:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def needs_lfs(path: Path) -> bool:
    if path.stat().st_size > HUB_TEXT_LIMIT:
        return True
    with path.open("rb") as handle:
        return b"\0" in handle.read(8192)


def check_hub_storable(folder: Path) -> None:
    """Every large or binary file must match an LFS pattern of .gitattributes (what the Hub accepts)."""
    bad = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
           if p.is_file() and needs_lfs(p) and not any(p.match(pattern) for pattern in LFS_PATTERNS)]
    if bad:
        raise CheckpointError("large or binary files the Hub would refuse (no Xet/LFS pattern): " + ", ".join(bad))


def space_readme(root: Path, model_repo: str | None, preload: str | None, categories) -> str:
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(root / "README.md")
    if model_repo:
        card.data.models = [model_repo]
        card.data.preload_from_hub = [preload]
    else:
        card.data.models = None
    checkpoints = (f"[{model_repo}](https://huggingface.co/{model_repo})" if model_repo
                   else "bundled in this Space") + f" ({', '.join(categories)})"
    body = SPACE_BODY.format(title=card.data.title, paper=f"[*{PAPER_TITLE}*]({PAPER_URL})", checkpoints=checkpoints)
    return f"---\n{card.data.to_yaml()}\n---\n{body}"


def assemble(out, model_repo: str | None = None, revision: str | None = None, root=ROOT, categories=None) -> Path:
    """Write the Space into `out` (replaced if it exists).

    With `model_repo`, checkpoints are preloaded from it at `revision` (a commit; the default branch's current commit
    when None, which asks the Hub); without, the local checkpoints/ are copied in.
    """
    root, out = Path(root), Path(out)
    categories = list(categories or list_local_categories(root / "checkpoints"))
    if not categories:
        raise CheckpointError(f"no categories: {root / 'checkpoints'} is empty and none were named")
    if model_repo and not revision:
        from huggingface_hub import HfApi

        revision = HfApi().model_info(model_repo).sha
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SPACE_FILES:
        shutil.copy2(root / name, out / name)
    _copy_tree(root / "diffad", out / "diffad", ("*.py",))
    _copy_tree(root / "examples", out / "examples")
    if not model_repo:
        for category in categories:
            for name in CHECKPOINT_FILES:
                (out / "checkpoints" / category).mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / "checkpoints" / category / name, out / "checkpoints" / category / name)
    preload = preload_entry(model_repo, categories, revision) if model_repo else None
    (out / "README.md").write_text(space_readme(root, model_repo, preload, categories))
    (out / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    check_hub_storable(out)
    return out


def upload(folder, space_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the Space (Gradio SDK) if needed and upload the folder in one commit, deleting files it no longer has."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder), delete_patterns=["*"],
                               commit_message="diffad space: update")
    return commit.commit_url
