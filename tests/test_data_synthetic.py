"""The synthetic multimodal generator: identity split, determinism, images, raw XC format, the job."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vixml_ray.cli import run
from vixml_ray.config import load_config
from vixml_ray.data import generate_synthetic, open_dataset
from vixml_ray.data.synthetic import vocabulary
from vixml_ray.data.synthetic_images import attribute_words
from vixml_ray.errors import ConfigError, OutputExistsError

A = 4
SMALL = ["data.synthetic.num_train=400", "data.synthetic.num_test=200", "data.synthetic.num_topics=12",
         f"data.synthetic.num_attributes={A}", "data.synthetic.image_size=24", "data.synthetic.seed=7"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "a"
    generate_synthetic(str(out), load_config(None, SMALL))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mean_colours(ds, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entity row, attribute, mean RGB) for every image file that exists."""
    labels = ds.table(split, ["labels"]).column("labels").to_pylist()
    rows, attrs, colours = [], [], []
    for rec in ds.image_manifest().to_pylist():
        path = Path(ds.image_uri(rec["uri"]))
        if rec["split"] != split or not path.exists():
            continue
        rows.append(rec["row"])
        attrs.append(labels[rec["row"]][0] % A)
        colours.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=(0, 1)))
    return np.array(rows), np.array(attrs), np.array(colours)


def test_same_seed_same_bytes(synthetic: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    generate_synthetic(str(again), load_config(None, SMALL))
    assert _files(again) == _files(synthetic)
    other = generate_synthetic(str(tmp_path / "c"), load_config(None, [*SMALL, "data.synthetic.seed=8"]))
    assert other["content_hash"] != json.loads((synthetic / "manifest.json").read_text())["content_hash"]


def test_item_texts_never_name_the_attribute(synthetic: Path) -> None:
    ds = open_dataset(str(synthetic))
    forbidden = attribute_words()
    for split in ("train", "test"):
        for text in ds.texts(split):
            assert not forbidden & set(text.split()), text
    names = ds.manifest["attributes"]
    assert len(names) == A and len(set(names)) == A
    for row, text in enumerate(ds.texts("label")):
        assert text.endswith(" " + names[row % A])
    assert not forbidden & set(vocabulary(100_000).to_pylist())  # no pseudo-word can ever be an attribute word


def test_text_only_is_capped_and_images_carry_the_attribute(synthetic: Path) -> None:
    ds = open_dataset(str(synthetic))
    label_topic_words = [set(t.split()[:3]) for t in ds.texts("label")]
    topic_of_words = {w: row // A for row, words in enumerate(label_topic_words) for w in words}

    def topic(text: str) -> int:
        return Counter(topic_of_words[w] for w in text.split() if w in topic_of_words).most_common(1)[0][0]

    train_labels = [ls[0] for ls in ds.table("train", ["labels"]).column("labels").to_pylist()]
    test_labels = [ls[0] for ls in ds.table("test", ["labels"]).column("labels").to_pylist()]
    test_texts = ds.texts("test")
    assert all(topic(t) == y // A for t, y in zip(test_texts, test_labels))  # the text names the topic
    # The best text-only rule: the topic's most frequent training attribute. It is right ~1/A of the time.
    prior = Counter(train_labels)
    text_only = [max(range(A), key=lambda a: prior[topic(t) * A + a]) + topic(t) * A for t in test_texts]
    p1_text = np.mean([p == y for p, y in zip(text_only, test_labels)])
    assert p1_text < 1 / A + 0.12

    # Images: mean colour alone recovers the attribute (nearest training centroid), so text + image >> text.
    _, train_attr, train_rgb = _mean_colours(ds, "train")
    centroids = np.stack([train_rgb[train_attr == a].mean(axis=0) for a in range(A)])
    rows, test_attr, test_rgb = _mean_colours(ds, "test")
    guess = np.argmin(((test_rgb[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(guess == test_attr) == 1.0
    gaps = [np.linalg.norm(centroids[a] - centroids[b]) for a in range(A) for b in range(a + 1, A)]
    spread = max(train_rgb[train_attr == a].std(axis=0).max() for a in range(A))
    assert min(gaps) > 4 * spread
    with_image = len(set(rows.tolist())) / ds.num_test
    assert with_image > 0.85  # text + image can be right on every test item with an image: far above 1/A


def test_image_manifest_and_missing_files(synthetic: Path) -> None:
    ds = open_dataset(str(synthetic))
    images = ds.image_manifest().to_pylist()
    assert {r["split"] for r in images} == {"train", "test", "label"}
    per_entity = Counter((r["split"], r["row"]) for r in images)
    assert set(per_entity.values()) <= {1, 2, 3} and len(per_entity) == 400 + 200 + 12 * A
    missing = [r for r in images if not Path(ds.image_uri(r["uri"])).exists()]
    assert 0 < len(missing) < 0.25 * len(images) and len(missing) == ds.manifest["counts"]["images_missing"]
    kinds = {Image.open(ds.image_uri(r["uri"])).format for r in images if r not in missing}
    assert kinds == {"PNG", "JPEG"}


def test_xc_format_round_trips_through_prepare(synthetic: Path, tmp_path: Path) -> None:
    from vixml_ray.data import prepare_dataset

    raw = tmp_path / "raw"
    summary = generate_synthetic(str(raw), load_config(None, SMALL), fmt="xc")
    assert sorted(p.name for p in raw.iterdir()) == ["lbl.json.gz", "trn.json.gz", "tst.json.gz"]
    assert summary["counts"] == {"train": 400, "test": 200, "labels": 12 * A}
    prepared = open_dataset(prepare_dataset(str(raw), str(tmp_path / "ds"), load_config())["out"])
    reference = open_dataset(str(synthetic))
    for split in ("train", "test", "label"):
        assert prepared.table(split).equals(reference.table(split))


def test_multi_label_items_share_one_attribute(tmp_path: Path) -> None:
    out = tmp_path / "multi"
    generate_synthetic(str(out), load_config(None, [*SMALL, "data.synthetic.labels_per_item=3",
                                                    "data.synthetic.max_images=0"]))
    ds = open_dataset(str(out))
    for labels in ds.table("train", ["labels"]).column("labels").to_pylist():
        assert len({y // A for y in labels}) == 3 and len({y % A for y in labels}) == 1
    assert ds.image_manifest().num_rows == 0
    with pytest.raises(ValueError, match="labels_per_item"):
        generate_synthetic(str(tmp_path / "x"), load_config(None, [*SMALL, "data.synthetic.labels_per_item=13"]))
    with pytest.raises(ConfigError, match="num_attributes"):
        load_config(None, ["data.synthetic.num_attributes=13"])


def test_prepare_data_job(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    run("prepare_data", ["--synthetic", "--format", "xc", "--out", str(raw), *SMALL])
    last = run("prepare_data", ["--source", str(raw), "--out", str(out), "data.write_batch_rows=64"])
    assert last["out"] == str(out) and last["counts"]["train"] == 400 and last["counts"]["labels"] == 12 * A
    with pytest.raises(OutputExistsError):
        run("prepare_data", ["--source", str(raw), "--out", str(out)])
    run("prepare_data", ["--source", str(raw), "--out", str(out), "--overwrite"])


def test_topic_zipf_gives_a_long_tail_of_distinct_labels(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.synthetic.num_train=3000", "data.synthetic.num_test=10",
                             "data.synthetic.num_topics=500", "data.synthetic.num_attributes=1",
                             "data.synthetic.labels_per_item=8", "data.synthetic.topic_zipf=1.0",
                             "data.synthetic.max_images=0"])
    generate_synthetic(str(tmp_path / "z"), cfg)
    labels = open_dataset(str(tmp_path / "z")).table("train", ["labels"]).column("labels").to_pylist()
    assert all(len(set(row)) == 8 == len(row) for row in labels)
    counts = np.bincount(np.concatenate(labels), minlength=500)
    assert counts[:5].mean() > 10 * counts[-250:].mean()  # uniform draws would give about equal counts
