"""The raw Extreme Classification Repository reader and prepare_dataset (real cooking data + hand-made sources)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vixml_ray.config import load_config
from vixml_ray.data import open_dataset, prepare_dataset
from vixml_ray.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def _write_jsonl(path: Path, rows: list) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def _item(uid: str, targets: list[int], title: str = "", content: str = "", rels: list[float] | None = None) -> dict:
    return {"uid": uid, "title": title or f"title of {uid}", "content": content, "target_ind": targets,
            "target_rel": rels if rels is not None else [1.0] * len(targets)}


def _source(tmp_path: Path, train: list, test: list, labels: list[str], name: str = "src") -> Path:
    src = tmp_path / name
    src.mkdir()
    _write_jsonl(src / "trn.json.gz", train)
    _write_jsonl(src / "tst.json.gz", test)
    _write_jsonl(src / "lbl.json.gz", [{"uid": u, "title": f"label {u}"} for u in labels])
    return src


def _no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(out.name + ".")], list(parent.iterdir())


def _raw(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_cooking_round_trip(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "cooking_stackexchange"
    out = tmp_path / "cooking"
    summary = prepare_dataset(str(src), str(out), load_config(None, ["data.write_batch_rows=5000"]))
    assert (summary["counts"]["train"], summary["counts"]["test"], summary["counts"]["labels"]) == (12404, 3000, 736)
    ds = open_dataset(str(out))
    assert (ds.num_train, ds.num_test, ds.num_labels) == (12404, 3000, 736)
    for split, stem in (("train", "trn"), ("test", "tst")):
        raw = _raw(src / f"{stem}.json.gz")
        assert ds.texts(split) == [r["title"] for r in raw]
        assert ds.uids(split) == [r["uid"] for r in raw]
        y = ds.label_matrix(split)
        assert y.shape == (len(raw), 736)
        assert [set(y.indices[y.indptr[i]:y.indptr[i + 1]].tolist()) for i in range(len(raw))] == \
            [set(r["target_ind"]) for r in raw]
        assert np.all(y.data == 1.0)
    assert ds.texts("label") == [r["title"] for r in _raw(src / "lbl.json.gz")]
    assert ds.filter_pairs().shape == (0, 2)  # auto: the source has no filter file
    assert ds.image_manifest().num_rows == 0
    assert ds.manifest["features"] == {} and ds.manifest["content_hash"] == summary["content_hash"]
    assert (out / "config.yaml").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_dataset(str(src), str(out), load_config())


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    src = _source(tmp_path, [_item("a", [0]), '{"uid": "b", "title": "x", "target_ind": [0', _item("c", [1])],
                  [_item("t", [0])], ["l0", "l1"])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"trn\.json\.gz:2: malformed JSON line"):
        prepare_dataset(str(src), str(out), load_config())
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("bad", [2, -1])
def test_target_out_of_range_names_uid_and_line(tmp_path: Path, bad: int) -> None:
    src = _source(tmp_path, [_item("a", [0])], [_item("t0", [1]), _item("t1", [0, bad])], ["l0", "l1"])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"tst\.json\.gz:2: uid 't1' has label index {bad} outside \[0, 2\)"):
        prepare_dataset(str(src), str(out), load_config(None, ["data.write_batch_rows=1"]))
    _no_leftovers(tmp_path, out)


def test_missing_key_and_bad_rel(tmp_path: Path) -> None:
    src = _source(tmp_path, [{"uid": "a", "target_ind": [0]}], [_item("t", [0])], ["l0"], name="nokey")
    with pytest.raises(InputError, match=r"trn\.json\.gz:1: missing key 'title'"):
        prepare_dataset(str(src), str(tmp_path / "o1"), load_config())
    src = _source(tmp_path, [_item("a", [0], rels=[1.0, 2.0])], [_item("t", [0])], ["l0"], name="badrel")
    with pytest.raises(InputError, match=r"trn\.json\.gz:1: key 'target_rel' must be a list of 1 numbers"):
        prepare_dataset(str(src), str(tmp_path / "o2"), load_config())
    src = _source(tmp_path, [_item("a", [0]), _item("b", [0, 1.5])], [_item("t", [0])], ["l0", "l1"], name="badind")
    with pytest.raises(InputError, match=r"trn\.json\.gz:2: key 'target_ind' must be a list of integers "
                                              r"\(uid 'b'\)"):
        prepare_dataset(str(src), str(tmp_path / "o3"), load_config())
    src = _source(tmp_path, [_item("a", [0], rels=["high"])], [_item("t", [0])], ["l0"], name="strrel")
    with pytest.raises(InputError, match=r"trn\.json\.gz:1: key 'target_rel' must be a list of numbers"):
        prepare_dataset(str(src), str(tmp_path / "o4"), load_config())


def test_text_fields_and_relevance(tmp_path: Path) -> None:
    src = _source(tmp_path, [_item("a", [1, 0], title="red apple", content="fresh fruit", rels=[0.5, 2.0]),
                             _item("b", [], title="empty", content="")], [_item("t", [1])], ["l0", "l1"])
    cfg = load_config(None, ["data.text_fields=[title,content]", 'data.text_separator=" | "'])
    ds = open_dataset(prepare_dataset(str(src), str(tmp_path / "out"), cfg)["out"])
    assert ds.texts("train") == ["red apple | fresh fruit", "empty"]
    assert ds.label_matrix("train").toarray().tolist() == [[2.0, 0.5], [0.0, 0.0]]


def test_nameless_labels(tmp_path: Path) -> None:
    """data.label_text=uid: every label's text is its uid (a label without a title is fine then); items keep their
    texts; the manifest records it. The default keeps the label names."""
    src = _source(tmp_path, [_item("a", [1, 0], title="red apple")], [_item("t", [1])], ["l0", "l1"])
    _write_jsonl(src / "lbl.json.gz", [{"uid": "l0", "title": "fruit"}, {"uid": 17}])
    with pytest.raises(InputError, match=r"lbl\.json\.gz:2: missing key 'title'"):
        prepare_dataset(str(src), str(tmp_path / "named"), load_config())
    summary = prepare_dataset(str(src), str(tmp_path / "nameless"), load_config(None, ["data.label_text=uid"]))
    ds = open_dataset(summary["out"])
    assert summary["label_text"] == ds.manifest["label_text"] == "uid"
    assert ds.texts("label") == ds.uids("label") == ["l0", "17"]
    assert ds.texts("train") == ["red apple"]
    _write_jsonl(src / "lbl.json.gz", [{"uid": "l0", "title": "fruit"}, {"uid": "l1", "title": "veg"}])
    named = open_dataset(prepare_dataset(str(src), str(tmp_path / "named"), load_config())["out"])
    assert named.texts("label") == ["fruit", "veg"] and named.manifest["label_text"] == "text"


def test_prepare_job_nameless_dnb(shared_data: Path, tmp_path: Path) -> None:
    """The prepare_data job with the override, on the real GND source: labels named by their uids (GND ids, not the
    German subject names), items unchanged."""
    src = shared_data / "dnb_casimir_gnd"
    out = tmp_path / "dnb-nameless"
    done = subprocess.run([sys.executable, "jobs/prepare_data.py", "--source", str(src), "--out", str(out),
                           "data.label_text=uid"], cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ds = open_dataset(str(out))
    raw = _raw(src / "lbl.json.gz")
    assert summary["label_text"] == "uid" and ds.num_labels == len(raw) == 11387
    assert ds.texts("label") == [r["uid"] for r in raw]
    assert sum(r["uid"] != r["title"] for r in raw) == len(raw)
    assert ds.texts("test") == [r["title"] for r in _raw(src / "tst.json.gz")]


def test_filter_file(tmp_path: Path) -> None:
    src = _source(tmp_path, [_item("a", [0])], [_item("t0", [0]), _item("t1", [1])], ["l0", "l1", "l2"])
    (src / "filter_labels_test.txt").write_text("1 2\n0 1\n1 2\n")
    ds = open_dataset(prepare_dataset(str(src), str(tmp_path / "out"), load_config())["out"])
    assert ds.manifest["filters"] == "file"
    assert ds.filter_pairs().tolist() == [[0, 1], [1, 2]]  # sorted, duplicates dropped
    none = prepare_dataset(str(src), str(tmp_path / "none"), load_config(None, ["data.filters=none"]))
    assert none["counts"]["filters"] == 0
    (src / "filter_labels_test.txt").write_text("0 1\n2 0\n")
    out = tmp_path / "bad"
    with pytest.raises(InputError, match=r"filter_labels_test\.txt:2: pair \(2, 0\) outside 2 test rows"):
        prepare_dataset(str(src), str(out), load_config())
    _no_leftovers(tmp_path, out)


def test_self_and_reciprocal_filters(tmp_path: Path) -> None:
    # Labels are items: uids A..D. Train item A has labels B and C; test items B, C, X; C is also a label.
    labels = ["A", "B", "C", "D"]
    train = [_item("A", [1, 2]), _item("Z", [1]), _item("D", [0])]
    test = [_item("B", [0]), _item("X", [3]), _item("C", [0, 3])]
    src = _source(tmp_path, train, test, labels)
    ds = open_dataset(prepare_dataset(str(src), str(tmp_path / "out"),
                                      load_config(None, ["data.filters=self_reciprocal", "data.write_batch_rows=2"]))
                      ["out"])
    # self: test B (row 0) ~ label B (1), test C (row 2) ~ label C (2).
    # reciprocal: train A (= label 0) links to B and C, which are test rows 0 and 2 -> (0, 0), (2, 0);
    #             train D (= label 3) links to A, not a test item; train Z is not a label.
    assert ds.filter_pairs().tolist() == [[0, 0], [0, 1], [2, 0], [2, 2]]


def test_trn_x_y_label_source(tmp_path: Path) -> None:
    src = _source(tmp_path, [_item("a", [0]), _item("b", [0])], [_item("t", [0])], ["l0", "l1", "l2"])
    (src / "trn_X_Y.txt").write_text("2 3\n1:0.5 2:1\n\n")
    (src / "tst_X_Y.txt").write_text("1 3\n0:1\n")
    auto = open_dataset(prepare_dataset(str(src), str(tmp_path / "auto"), load_config())["out"])
    assert auto.manifest["label_source"] == "xy"
    assert auto.label_matrix("train").toarray().tolist() == [[0, 0.5, 1], [0, 0, 0]]
    json_ds = open_dataset(prepare_dataset(str(src), str(tmp_path / "json"),
                                           load_config(None, ["data.label_source=json"]))["out"])
    assert json_ds.label_matrix("train").toarray().tolist() == [[1, 0, 0], [1, 0, 0]]

    (src / "trn_X_Y.txt").write_text("2 3\n1:0.5 2:1\n")
    with pytest.raises(InputError, match=r"trn_X_Y\.txt: has 2 rows .* is item 2"):
        prepare_dataset(str(src), str(tmp_path / "short"), load_config())
    (src / "trn_X_Y.txt").write_text("2 3\n1:0.5 2:x\n\n")
    with pytest.raises(InputError, match=r"trn_X_Y\.txt:2: bad 'label:value' pair '2:x'"):
        prepare_dataset(str(src), str(tmp_path / "bad"), load_config())
    (src / "trn_X_Y.txt").write_text("2 3\n1:0.5 5:1\n\n")
    with pytest.raises(InputError, match=r"trn_X_Y\.txt:2: uid 'a' has label index 5"):
        prepare_dataset(str(src), str(tmp_path / "range"), load_config())
    (src / "trn_X_Y.txt").write_text("2 4\n1:0.5\n\n")
    with pytest.raises(InputError, match=r"trn_X_Y\.txt:1: header says 4 labels, the label file has 3"):
        prepare_dataset(str(src), str(tmp_path / "cols"), load_config())
