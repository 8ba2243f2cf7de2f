"""Readers: leave-one-out, the amazon2018 held-out rule, and DataError messages."""

import re

import pytest

from oxyjax.data import readers
from oxyjax.data.readers import DataError, Example

from .conftest import REAL_DATA, write_2014, write_items_json, write_rows_csv


# --------------------------------------------------------------------------- amazon2014


def test_leave_one_out_tiny(tiny2014):
    ds = readers.read_amazon2014(tiny2014 / "amazon2014" / "Beauty.txt")
    # items sorted numerically -> 10:1 11:2 12:3 13:4 20:5 21:6 22:7 30:8 31:9 32:10
    assert ds.raw_item_ids == ["", "10", "11", "12", "13", "20", "21", "22", "30", "31", "32"]
    assert ds.num_items == 10 and ds.num_users == 3
    assert ds.item_index["30"] == 8 and ds.user_index == {"1": 1, "2": 2, "3": 3}
    assert ds.item_meta is None
    assert ds.train == [
        Example(1, (1,), 2),
        Example(3, (2,), 8),
        Example(3, (2, 8), 3),
    ]
    assert ds.validation == [
        Example(1, (1, 2), 3),
        Example(2, (5,), 6),
        Example(3, (2, 8, 3), 9),
    ]
    assert ds.test == [
        Example(1, (1, 2, 3), 4),
        Example(2, (5, 6), 7),
        Example(3, (2, 8, 3, 9), 10),
    ]


def test_load_dataset_data_dir_and_env(tiny2014, monkeypatch):
    ds = readers.load_dataset("oxyjax_beauty", data_dir=tiny2014)
    assert ds.num_items == 10 and ds.name == "beauty"
    assert readers.load_dataset("beauty", data_dir=tiny2014) is ds  # cached
    monkeypatch.setenv("OXYJAX_DATA_DIR", str(tiny2014))
    assert readers.default_data_dir() == tiny2014
    assert readers.load_dataset("beauty").num_users == 3


def _err(excinfo):
    return str(excinfo.value)


@pytest.mark.parametrize(
    "lines, line_no, problem",
    [
        (["1 10 11 12", "2 20 x3 22"], 2, "item id 'x3' is not an integer"),
        (["1 10 11 12", "", "7"], 3, "malformed line: user 7 has no items"),
        (["u1 10 11 12"], 1, "user id 'u1' is not an integer"),
        (["1 10 11 12", "2 20 21"], 2, "user 2 has 2 item(s); leave-one-out needs at least 3"),
        (["1 10 11 12", "2 20 21 22", "1 5 6 7"], 3, "duplicate user id 1 (first on line 1)"),
    ],
)
def test_amazon2014_errors(tmp_path, lines, line_no, problem):
    path = write_2014(tmp_path / "bad.txt", lines)
    with pytest.raises(DataError) as ei:
        readers.read_amazon2014(path)
    assert _err(ei) == f"{path}:{line_no}: {problem}"
    assert ei.value.line == line_no and ei.value.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.txt'}: file not found")):
        readers.read_amazon2014(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="Beauty.txt: file not found"):
        readers.load_dataset("beauty", data_dir=tmp_path)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'd' / 'items.json'}: file not found")):
        readers.read_amazon2018(tmp_path / "d")


# --------------------------------------------------------------------------- amazon2018

VALID_ROWS = [
    ("A", [1, 2, 3], 4),
    ("B", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 10),
    ("A", [1, 2, 3, 4], 5),
    ("B", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 11),  # window slid past item 0
    ("D", [15, 16, 17], 18),
    ("E", [7], 8),
]
TEST_ROWS = [
    ("A", [1, 2, 3, 4, 5], 6),
    ("B", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 12),
    ("C", [7], 8),
    ("D", [15, 16], 17),  # equals a training candidate of D: must be dropped from train
]


def make_2018(root, valid=VALID_ROWS, test=TEST_ROWS, items=range(20)):
    write_items_json(root / "items.json", items)
    write_rows_csv(root / "valid.csv", valid)
    write_rows_csv(root / "test.csv", test)
    return root


def test_amazon2018_held_out_rule(tmp_path):
    ds = readers.read_amazon2018(make_2018(tmp_path / "cat"))
    assert ds.num_items == 20 and ds.raw_item_ids[1] == "0" and ds.item_index["19"] == 20
    assert ds.user_index == {"A": 1, "B": 2, "D": 3, "E": 4, "C": 5}

    def raw(examples):
        return [(ds.raw_user_ids[u], [int(ds.raw_item_ids[i]) for i in h], int(ds.raw_item_ids[t]))
                for u, h, t in examples]

    assert raw(ds.validation) == [(u, h, t) for u, h, t in VALID_ROWS]
    assert raw(ds.test) == [(u, h, t) for u, h, t in TEST_ROWS]
    expected = [("A", [1], 2), ("A", [1, 2], 3)]
    expected += [("B", list(range(i)), i) for i in range(1, 10)]
    expected += [("D", [15], 16)]
    assert raw(ds.train) == expected
    assert len(set(ds.train)) == len(ds.train)

    # No validation target is a training target at that position: no training example
    # with the same user and target whose history agrees with the validation history.
    for u, h, t in ds.validation + ds.test:
        for tu, th, tt in ds.train:
            if tu == u and tt == t:
                k = min(len(h), len(th))
                assert th[len(th) - k:] != h[len(h) - k:], (u, h, t, th)


def test_item_text(tmp_path):
    ds = readers.read_amazon2018(make_2018(tmp_path / "cat"))
    text = ds.item_text(ds.item_index["3"])
    assert text == "Title: Item 3. Brand: Brand0. Description: About item 3. More."
    assert ds.item_meta[ds.item_index["3"]].brand == "Brand0"
    assert ds.item_text(1, max_description_chars=0) == "Title: Item 0. Brand: Brand0."


@pytest.mark.parametrize(
    "which, rows, line_no, problem",
    [
        ("valid", [("A", [1, 2], 3), ("A", [1, 2, 3], 99)], 3,
         "unknown item id '99' (not in items.json)"),
        ("test", [("A", [1, 42], 3)], 2, "unknown item id '42' (not in items.json)"),
        ("valid", [("A", [1, 2], 3), ("B", [], 3)], 3, "empty history (history_item_id is [])"),
        ("valid", [("A", "[1, 2", 3)], 2, "history_item_id '[1, 2' is not a Python list literal"),
        ("valid", [("A", "__import__('os')", 3)], 2,
         "history_item_id \"__import__('os')\" is not a Python list literal"),
        ("valid", [("A", "[1.5]", 3)], 2, "history_item_id '[1.5]' contains a non-integer item id"),
        ("valid", [("A", "['x']", 3)], 2, "unknown item id 'x' (not in items.json)"),
        ("valid", [("A", [1], "")], 2, "empty item_id (no target)"),
    ],
)
def test_amazon2018_row_errors(tmp_path, which, rows, line_no, problem):
    root = make_2018(tmp_path / "cat")
    path = write_rows_csv(root / f"{which}.csv", rows)
    with pytest.raises(DataError) as ei:
        readers.read_amazon2018(root)
    assert _err(ei) == f"{path}:{line_no}: {problem}"


def test_amazon2018_malformed_csv(tmp_path):
    root = make_2018(tmp_path / "cat")
    path = root / "valid.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["A,only,three"] + lines[2:]) + "\n")
    with pytest.raises(DataError) as ei:
        readers.read_amazon2018(root)
    assert _err(ei) == f"{path}:3: malformed csv row: 3 fields, header has 7"

    path.write_text("user_id,item_id\nA,3\n")
    with pytest.raises(DataError) as ei:
        readers.read_amazon2018(root)
    assert _err(ei).startswith(f"{path}:1: missing column(s) ['history_item_id']")


def test_amazon2018_bad_items_json(tmp_path):
    root = make_2018(tmp_path / "cat")
    (root / "items.json").write_text('{\n  "0": {"title": "a"},\n  "1": oops\n}\n')
    with pytest.raises(DataError) as ei:
        readers.read_amazon2018(root)
    assert _err(ei).startswith(f"{root / 'items.json'}:3: invalid JSON")


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (REAL_DATA / "amazon2014").exists(), reason="no real data")
def test_real_counts_match_readme():
    beauty = readers.load_dataset("beauty")
    sports = readers.load_dataset("sports")
    assert (beauty.num_users, beauty.num_items) == (22_363, 12_101)
    assert (sports.num_users, sports.num_items) == (35_598, 18_357)
    assert sum(len(e.history) + 1 for e in beauty.test) == 198_502
    assert sum(len(e.history) + 1 for e in sports.test) == 296_337
    assert len(beauty.train) == 198_502 - 3 * 22_363
    ind = readers.load_dataset("industrial")
    off = readers.load_dataset("office")
    assert ind.stats() == {"users": 3285, "items": 3686, "train": 6424,
                           "validation": 4532, "test": 4533}
    assert off.stats() == {"users": 3231, "items": 3459, "train": 4985,
                           "validation": 4866, "test": 4866}
    assert ind.item_text(1).startswith("Title: SUPCO SPP6")
