"""The online predictor: raw test queries (text + image files) through the vision tower, the model and the sharded
index give exactly the evaluation job's predictions (whose image features came from the embedding pipeline)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from inference_helpers import evaluated_setup, inference_config
from vixml_ray.cli import run
from vixml_ray.data.dataset import open_dataset
from vixml_ray.eval.evaluate import read_predictions
from vixml_ray.index.refresh import refresh_labels
from vixml_ray.predict.predictor import Predictor, Query

pytestmark = pytest.mark.slow


def query_images(dataset: str) -> list[list[str]]:
    """Absolute paths of each test row's image slots in slot order (files left out by the generator included)."""
    ds = open_dataset(dataset)
    manifest = ds.image_manifest().to_pylist()
    images: list[list[str]] = [[] for _ in range(ds.num_test)]
    for entry in sorted((m for m in manifest if m["split"] == "test"), key=lambda m: (m["row"], m["slot"])):
        images[entry["row"]].append(ds.image_uri(entry["uri"]))
    return images


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    """A dataset whose features come from the real embedding pipeline, the export, its index and its evaluation."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = inference_config(tmp)
    dataset, export, index = evaluated_setup(tmp, cfg)
    return {"tmp": tmp, "cfg": cfg, "dataset": dataset, "export": export, "index": index,
            "predictions": read_predictions(str(tmp / "eval")), "images": query_images(dataset)}


def test_predict_job_equals_the_evaluation_predictions(setup):
    ds = open_dataset(setup["dataset"])
    texts, images = ds.texts("test"), setup["images"]
    assert any(not Path(p).exists() for slots in images for p in slots)  # missing files are masked, as in the cache
    first = [{"b64": base64.b64encode(Path(p).read_bytes()).decode()} if Path(p).exists() else p for p in images[0]]
    lines = [json.dumps({"id": f"t{row}", "text": text, "images": slots})
             for row, (text, slots) in enumerate(zip(texts, images))]
    lines += ["not json", json.dumps({"text": 5}), json.dumps({"text": "x", "images": [1]}),
              json.dumps({"id": "inline", "text": texts[0], "images": first})]
    queries, out = setup["tmp"] / "queries.jsonl", setup["tmp"] / "predictions.jsonl"
    queries.write_text("\n".join(lines) + "\n")

    summary = run("predict", ["--checkpoint", setup["export"], "--index", setup["index"], "--queries", str(queries),
                              "--out", str(out), "--k", str(setup["cfg"].eval.topk)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert (summary["queries"], summary["predicted"], summary["skipped"]) == (len(lines), ds.num_test + 1, 3)
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    assert summary["image_errors"] == {"missing": sum(not Path(p).exists() for s in images for p in s)
                                       + sum(not Path(p).exists() for p in images[0])}

    rows, expected_ids, expected_scores = setup["predictions"]
    label_texts = ds.texts("label")
    for row in rows:
        record = records[row]
        assert record["id"] == f"t{row}" and record["version"] == "v1"
        assert record["labels"] == expected_ids[row].tolist()
        np.testing.assert_allclose(record["scores"], expected_scores[row], atol=1e-5)
        assert record["names"] == [label_texts[i] for i in record["labels"]]
    errors = [r["error"] for r in records[ds.num_test: ds.num_test + 3]]
    assert f"{queries}:{ds.num_test + 1}: not JSON" in errors[0]
    assert "key 'text' must be a string" in errors[1] and "key 'images[0]'" in errors[2]
    assert records[-1]["labels"] == records[0]["labels"] and records[-1]["id"] == "inline"


def test_bad_image_bytes_are_masked_like_a_missing_slot(setup):
    text, slots = open_dataset(setup["dataset"]).texts("test")[1], setup["images"][1]
    readable = [p for p in slots if Path(p).exists()]
    with Predictor(setup["export"], setup["index"]) as predictor:
        with_corrupt, without = predictor.predict([Query(text, (b"not an image", *readable)),
                                                   Query(text, tuple(readable))], k=5)
        text_only = predictor.predict([Query(text)], k=5)[0]
    assert with_corrupt.image_errors == ["corrupt"] + [None] * len(readable)
    assert with_corrupt.ids == without.ids and with_corrupt.scores == pytest.approx(without.scores, abs=1e-6)
    assert text_only.image_errors == [] and text_only.scores != pytest.approx(without.scores, abs=1e-4)


def test_swap_serves_a_new_version_with_its_names(setup):
    with Predictor(setup["export"], setup["index"]) as predictor:
        before = predictor.index.version
        refresh_labels(setup["export"], setup["dataset"], setup["index"], incremental=True)
        after = predictor.swap()
        prediction = predictor.predict([Query("anything")], k=3)[0]
    assert after == f"v{int(before[1:]) + 1}" and prediction.version == after
    assert prediction.names == [open_dataset(setup["dataset"]).texts("label")[i] for i in prediction.ids]
