"""What every benchmark section shares: where the data is, and how figures and metric rows are written."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "bottle": ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile",
}


def fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def metric_table(rows: dict, names) -> list[str]:
    """A markdown table: one row per method or variant, one column per metric."""
    out = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    return out + [f"| {name} | " + " | ".join(fmt(m[k]) for k in names) + " |" for name, m in rows.items()]
