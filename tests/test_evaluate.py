"""The evaluation job: its predictions and metrics equal numpy brute force over the same embeddings (filter pairs
removed from the predictions only); it writes metrics.json, the markdown table, the plot and the predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inference_helpers import (
    inference_config,
    make_dataset,
    make_export,
    reference_embeddings,
    write_random_features,
)
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.eval.evaluate import evaluate, read_predictions
from vixml_ray.eval.metrics import inverse_propensity, xmc_metrics
from vixml_ray.index import VersionWriter, read_manifest, read_rows
from vixml_ray.index.refresh import refresh_labels


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    """A dataset whose filter pairs knock out the unfiltered top label of test rows 0-3 and a true label of rows
    4-5, the export, its label index, and one evaluation run against that index."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = inference_config(tmp)
    dataset = make_dataset(tmp / "ds", cfg)
    write_random_features(dataset, cfg)
    export = make_export(tmp / "export", cfg)
    index = str(tmp / "index")
    refresh_labels(export, dataset, index)
    manifest = read_manifest(index)
    labels = read_rows(index, manifest, 0, manifest.num_labels)
    queries = reference_embeddings(export, dataset, "test")
    truth = open_dataset(dataset).label_matrix("test")
    pairs = [(row, int(np.argmax(queries[row] @ labels.T))) for row in range(4)]
    pairs += [(row, int(truth[row].indices[0])) for row in (4, 5)]
    pq.write_table(pa.table({"row": [p[0] for p in pairs], "label": [p[1] for p in pairs]},
                            schema=schema.FILTERS_SCHEMA), Path(dataset) / schema.FILTERS_FILE)
    summary = evaluate(export, dataset, str(tmp / "eval"), index_dir=index)
    return {"tmp": tmp, "cfg": cfg, "dataset": dataset, "export": export, "index": index, "labels": labels,
            "queries": queries, "pairs": np.asarray(pairs), "summary": summary, "out": tmp / "eval"}


def brute_force_topk(queries: np.ndarray, labels: np.ndarray, pairs: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ labels.T
    scores[pairs[:, 0], pairs[:, 1]] = -np.inf
    ids = np.broadcast_to(np.arange(len(labels)), scores.shape)
    return np.lexsort((ids, -scores), axis=1)[:, :k]


def test_predictions_and_metrics_equal_brute_force(setup):
    k, topk = setup["cfg"].eval.k, setup["cfg"].eval.topk
    expected = brute_force_topk(setup["queries"], setup["labels"], setup["pairs"], topk)
    rows, predicted, scores = read_predictions(str(setup["out"]))
    assert rows.tolist() == list(range(24)) and all(len(p) == topk for p in predicted)
    assert np.array_equal(np.stack(predicted), expected)
    assert all(np.all(np.diff(s) <= 0) for s in scores)
    for row, label in setup["pairs"]:
        assert label not in predicted[row]

    dataset = open_dataset(setup["dataset"])
    truth = dataset.label_matrix("test")
    p_at_1 = float(np.mean([truth[i, expected[i, 0]] > 0 for i in range(len(expected))]))
    metrics = json.loads((setup["out"] / "metrics.json").read_text())
    assert metrics["metrics"]["P@1"] == p_at_1 and setup["summary"]["P@1"] == round(p_at_1, 6)
    inv = inverse_propensity(dataset.label_matrix("train"), setup["cfg"].eval.propensity_a,
                             setup["cfg"].eval.propensity_b)
    for name, values in xmc_metrics(expected, truth, k, inv).items():
        assert metrics["at_k"][name] == pytest.approx(values.tolist(), abs=1e-12)
    assert metrics["counts"] == {"queries": 24, "test_items": 24, "labels": 30, "filter_pairs": 6, "topk": topk}


def test_a_sample_embeds_and_scores_only_its_rows(setup):
    """eval.sample_size: a seeded uniform sample of test rows is embedded (only those rows enter the pipeline),
    retrieved and scored; its predictions are the full run's rows."""
    from vixml_ray.config import replace

    cfg = replace(setup["cfg"], **{"eval.sample_size": 9, "eval.sample_seed": 3})
    out = setup["tmp"] / "eval-sample"
    summary = evaluate(setup["export"], setup["dataset"], str(out), index_dir=setup["index"], cfg=cfg)
    sample = np.sort(np.random.default_rng(3).choice(24, size=9, replace=False))
    rows, predicted, _ = read_predictions(str(out))
    assert rows.tolist() == sample.tolist() and summary["queries"] == 9
    full = read_predictions(str(setup["out"]))[1]
    assert all(np.array_equal(predicted[i], full[row]) for i, row in enumerate(sample))
    metrics = json.loads((out / "metrics.json").read_text())
    truth = open_dataset(setup["dataset"]).label_matrix("test")[sample]
    assert metrics["at_k"]["P"] == pytest.approx(
        xmc_metrics(np.stack(predicted), truth, cfg.eval.k)["P"].tolist(), abs=1e-12)
    assert metrics["counts"]["queries"] == 9 and metrics["sample"] == {"size": 9, "seed": 3}


def test_scoring_streams_the_training_labels(setup, monkeypatch):
    """Metrics need the training label counts only: scoring streams them instead of building the training split's
    label matrix (2.2M x 1.3M at LF-AmazonTitles-1.3M size), and the figures are the same."""
    from vixml_ray.data.dataset import Dataset
    from vixml_ray.eval.evaluate import score

    dataset = open_dataset(setup["dataset"])
    rows, predicted, _ = read_predictions(str(setup["out"]))
    label_matrix = Dataset.label_matrix

    def test_split_only(self, split, rows=None):
        assert split == "test", "scoring built the training label matrix"
        return label_matrix(self, split, rows)

    monkeypatch.setattr(Dataset, "label_matrix", test_split_only)
    scored = score(setup["cfg"], dataset, np.stack(predicted))
    metrics = json.loads((setup["out"] / "metrics.json").read_text())
    assert scored["at_k"] == metrics["at_k"] and scored["deciles"] == metrics["deciles"]


def test_reports_table_plot_and_deciles(setup):
    out, k = setup["out"], setup["cfg"].eval.k
    metrics = json.loads((out / "metrics.json").read_text())
    deciles = metrics["deciles"]
    assert [d["decile"] for d in deciles] == list(range(1, 11)) and sum(d["labels"] for d in deciles) == 30
    assert sum(d[f"P@{k}"] for d in deciles) == pytest.approx(metrics["metrics"][f"P@{k}"], abs=1e-12)
    assert all(a["min_count"] >= b["max_count"] for a, b in zip(deciles, deciles[1:]))
    table = (out / "metrics.md").read_text()
    assert f"| P | {100 * metrics['metrics']['P@1']:.2f} |" in table and "| PSnDCG |" in table
    with Image.open(out / "metrics.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json", "metrics.md", "metrics.png",
                                                      "predictions.parquet"]
    assert setup["summary"]["out"] == str(out) and setup["summary"]["version"] == "v1"
    with pytest.raises(FileExistsError, match="already exists"):
        evaluate(setup["export"], setup["dataset"], str(out), index_dir=setup["index"])


def test_refuses_an_index_embedded_by_another_model(setup):
    index = str(setup["tmp"] / "foreign-index")
    writer = VersionWriter(index)
    path = writer.new_version()
    writer.write_shard(path, 0, np.arange(30), setup["labels"])
    writer.commit(path, {"export": {"uri": "elsewhere", "fingerprint": "0" * 64}})
    with pytest.raises(ValueError, match="was embedded by the export 'elsewhere'"):
        evaluate(setup["export"], setup["dataset"], str(setup["tmp"] / "eval-foreign"), index_dir=index)


@pytest.mark.slow
def test_without_an_index_a_temporary_refresh_gives_the_same_predictions(setup):
    out = setup["tmp"] / "eval-temporary"
    summary = evaluate(setup["export"], setup["dataset"], str(out))
    assert summary["P@1"] == setup["summary"]["P@1"]
    assert np.array_equal(np.stack(read_predictions(str(out))[1]), np.stack(read_predictions(str(setup["out"]))[1]))
    assert json.loads((out / "metrics.json").read_text())["index"]["temporary"] is True
    assert not list((setup["tmp"] / "cache").glob("eval-index-*"))  # the temporary index is removed
