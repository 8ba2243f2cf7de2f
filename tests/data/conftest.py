"""Fixtures for the data-layer tests: tiny hand-written raw files under tmp_path."""

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REAL_DATA = REPO / "data"

CSV_HEADER = ["user_id", "history_item_title", "item_title", "history_item_id", "item_id",
              "history_item_sid", "item_sid"]


def write_2014(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_items_json(path: Path, ids) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {str(i): {"title": f"Item {i}", "description": f"['About item {i}.', 'More.']",
                      "brand": f"Brand{i % 3}", "categories": ""} for i in ids}
    path.write_text(json.dumps(items, indent=2))
    return path


def write_rows_csv(path: Path, rows) -> Path:
    """rows: (user, history list | raw string, target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for user, hist, target in rows:
            hist_s = hist if isinstance(hist, str) else str(list(hist))
            w.writerow([user, "['t']", "t", hist_s, target, "['<a_1>']", "<a_1>"])
    return path


@pytest.fixture
def tiny2014(tmp_path):
    """A data dir with a tiny amazon2014/Beauty.txt."""
    write_2014(tmp_path / "data" / "amazon2014" / "Beauty.txt", [
        "1 10 11 12 13",
        "2 20 21 22",
        "",
        "3 11 30 12 31 32",
    ])
    return tmp_path / "data"
