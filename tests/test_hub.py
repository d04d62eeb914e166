"""`diffad push`: one commit with every category's files and the root model card; the Hub itself is mocked at
huggingface_hub's HfApi boundary."""
import json
import shutil
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError

from diffad.cli import main
from diffad.hub import PAPER_URL, category_section, training_command
from tests.conftest import CHECKPOINTS, copy_of

METRICS = {"overall": {"image_auroc": 0.95, "pixel_auroc": 0.9, "aupro": 0.8, "image_f1_max": 0.7,
                       "pixel_f1_max": 0.4, "images": 8},
           "hole": {"image_auroc": 1.0, "pixel_auroc": 0.92, "aupro": 0.85, "image_f1_max": 1.0,
                    "pixel_f1_max": 0.5, "images": 4}}


class FakeHub:
    """Records what push sends; `card` is the repo's current README.md (None: a new repo)."""

    def __init__(self, monkeypatch, tmp_path, card: str | None = None):
        self.calls, self.operations = [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub.calls.append(("create_branch", repo_id, branch, kwargs))

        def hf_hub_download(api, repo_id, filename, **kwargs):
            hub.calls.append(("download", repo_id, filename, kwargs))
            if card is None:
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            path = tmp_path / "remote_README.md"
            path.write_text(card)
            return str(path)

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            hub.calls.append(("create_commit", repo_id, commit_message, revision))
            hub.operations = list(operations)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

        for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                         ("hf_hub_download", hf_hub_download), ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, fn)

    def commits(self):
        return [c for c in self.calls if c[0] == "create_commit"]

    def uploaded(self) -> dict:
        """path in repo -> bytes (or the local file's bytes)."""
        result = {}
        for op in self.operations:
            source = op.path_or_fileobj
            result[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        return result

    def card(self) -> ModelCard:
        return ModelCard(self.uploaded()["README.md"].decode())


@pytest.fixture
def evaluated(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path / "checkpoints")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "metrics.md").write_text("| subset | image_auroc |\n|---|---|\n| overall | 0.950 |\n")
    (folder / "train_state.pt").write_bytes(b"pickled optimizer state")  # must never be uploaded
    return folder


def test_push_one_category_is_one_commit_with_a_root_card(evaluated, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, tmp_path)
    code = main(["push", "--checkpoint", str(evaluated), "--repo-id", "someone/diffad-checkpoints",
                 "--dataset", "someone/parts", "--data-note", "Generated parts, CC0."])
    assert code == 0 and "uploaded: https://huggingface.co/someone/diffad-checkpoints/commit/abc" in capsys.readouterr().out
    assert [c[0] for c in hub.calls] == ["create_repo", "download", "create_commit"]  # no branch asked for
    assert len(hub.commits()) == 1
    files = hub.uploaded()
    assert sorted(files) == ["README.md", "part/config.json", "part/metrics.json", "part/metrics.md",
                             "part/model.safetensors", "part/train_log.csv"]
    assert files["part/model.safetensors"] == (evaluated / "model.safetensors").read_bytes()

    card = hub.card()
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.library_name == "diffad"
    assert "anomaly-detection" in card.data.tags and card.data.datasets == ["someone/parts"]
    results = {(r.task_type, r.metric_name): r for r in card.data.eval_results}
    assert results[("image-classification", "image AUROC")].metric_value == 0.95
    assert results[("image-segmentation", "pixel AUROC")].metric_value == 0.9
    assert results[("image-segmentation", "AUPRO@0.3")].metric_value == 0.8
    assert all(r.dataset_type == "someone/parts" and r.dataset_config == "part" and r.dataset_split == "test"
               for r in card.data.eval_results)
    text = card.text
    assert PAPER_URL in text and "Generated parts, CC0." in text
    assert 'load_checkpoint("someone/diffad-checkpoints", category="part")' in text
    assert "diffad train --data" in text and "| overall | 0.950 |" in text


def test_push_to_a_revision_creates_the_branch_and_keeps_other_categories(evaluated, tmp_path, monkeypatch):
    # The repo already holds "bottle" (section and metrics); pushing "part" keeps both.
    first = FakeHub(monkeypatch, tmp_path)
    bottle = copy_of(evaluated, tmp_path / "other")
    config = json.loads((bottle / "config.json").read_text())
    (bottle / "config.json").write_text(json.dumps({**config, "category": "bottle"}))
    shutil.move(bottle, bottle.parent / "bottle")
    assert main(["push", "--checkpoint", str(bottle.parent / "bottle"), "--repo-id", "someone/ckpts"]) == 0
    existing = first.uploaded()["README.md"].decode()

    hub = FakeHub(monkeypatch, tmp_path, card=existing)
    assert main(["push", "--checkpoint", str(evaluated), "--repo-id", "someone/ckpts", "--revision", "v2"]) == 0
    assert ("create_branch", "someone/ckpts", "v2", {"exist_ok": True}) in hub.calls
    assert hub.commits()[0][3] == "v2"
    download = next(c for c in hub.calls if c[0] == "download")
    assert download[3]["revision"] == "v2"  # the card merged is the branch's own
    card = hub.card()
    assert {r.dataset_config for r in card.data.eval_results} == {"bottle", "part"}
    assert "## `bottle`" in card.text and "## `part`" in card.text
    assert not any(path.startswith("bottle/") for path in hub.uploaded())  # only what was asked is uploaded


def test_push_a_folder_of_categories_and_without_metrics(tiny_checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    copy_of(tiny_checkpoint, root)
    hub = FakeHub(monkeypatch, tmp_path)
    assert main(["push", "--checkpoint", str(root), "--repo-id", "someone/ckpts"]) == 0
    card = hub.card()
    assert card.data.eval_results is None and "No metrics yet" in card.text
    assert "part/config.json" in hub.uploaded()


def test_training_command_names_the_recipe():
    config = {"category": "tile", "scoring": {"timesteps": [20, 200, 400], "top_k": 4096},
              "calibration": {"features": [{"pool": 1}, {"pool": 3}, {"pool": 9}], "smoothing_sigma": 2.0},
              "training": {"data": "data/tiles", "resolution": 256, "steps": 5980, "batch_size": 32, "lr": 0.0002,
                           "augment": "flip", "seed": 0, "device": "cpu", "precision": "fp32", "net": {}}}
    command = training_command(config)
    assert command.splitlines() == [
        "diffad train --data data/tiles --out checkpoints/tile --resolution 256 --steps 5980 --batch-size 32 "
        "--lr 0.0002 --augment flip --seed 0",
        "diffad calibrate --checkpoint checkpoints/tile --data data/tiles --feature-pool 1,3,9 --scoring "
        "'{\"top_k\": 4096}' --smoothing 2.0",
    ]


def test_the_shipped_tile_card_says_how_it_was_made_and_scores():
    """The card of the shipped magnetic_tile: trained on windows at each photo's aspect from another network, on a
    GPU, calibrated with three pooling sizes, its morph smoothing chosen on validation; running its commands must give
    that model, not a squashed one."""
    config = json.loads((CHECKPOINTS / "magnetic_tile" / "config.json").read_text())
    init, train, calibrate = training_command(config).splitlines()
    assert init == f"# --init-from {config['training']['init_from']}"
    assert "--device cuda --precision bf16" in train and '"aspect": "windows"' in train and "--net" in train
    assert "--feature-pool 1,3,9" in calibrate and '"top_k": 4096' in calibrate
    assert calibrate.endswith("""--smoothing 0.0 --threshold-quantile 0.95 --morph '{"gradient_smoothing": 4.0, "timestep": 20}'""")
    section = category_section(CHECKPOINTS / "magnetic_tile", config, None)
    assert "feature pooling [1, 3, 9]" in section and "windows at their own aspect" in section
    assert "(the 0.95 quantile of held-out normal images' scores)" in section


def test_an_unreachable_hub_is_one_line_and_exit_2(evaluated, monkeypatch, capsys):
    def refuse(api, repo_id, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", "--checkpoint", str(evaluated), "--repo-id", "someone/ckpts"]) == 2
    assert capsys.readouterr().err == "error: connection refused\n"
