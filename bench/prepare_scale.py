"""prepare_data at repository scale: time and PEAK RSS of the streaming conversion, against the plain way.

Generates raw XC files (synthetic, image-less) of ``--items`` training items, ``--labels`` labels and
``--test-items`` test items (default 0.44 x items, the LF-AmazonTitles-1.3M ratio), then runs
``prepare_dataset`` on them in a fresh child process and reads that child's peak RSS. Several ``--items`` values
show whether peak RSS grows with the item count (it should not: the conversion streams). ``--plain`` also runs the
plain single-process way (read each file fully into memory, build one table, write it) for the ratio.

    python bench/prepare_scale.py                                 # 2.2M items / 1.3M labels
    python bench/prepare_scale.py --items 550000 2200000 --plain  # two sizes, plus the plain way

Prints one JSON object per run and a final JSON line with all runs and the RSS growth between the sizes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vixml_ray.config import load_config
from vixml_ray.data import generate_synthetic, prepare_dataset

NUM_ATTRIBUTES = 4


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _child_prepare(source: str, out: str, overrides: list[str]) -> None:
    start = time.perf_counter()
    summary = prepare_dataset(source, out, load_config(None, overrides))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": _peak_rss_mb(),
                      "counts": summary["counts"]}))


def _child_plain(source: str, out: str) -> None:
    """The plain way: every file read into Python objects, one pyarrow table per file, written at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    Path(out).mkdir(parents=True)
    for stem in ("lbl", "tst", "trn"):
        with gzip.open(Path(source) / f"{stem}.json.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        columns = {"row": list(range(len(rows))), "uid": [r["uid"] for r in rows], "text": [r["title"] for r in rows]}
        if stem != "lbl":
            columns["labels"] = [r["target_ind"] for r in rows]
            columns["label_rels"] = [r["target_rel"] for r in rows]
        pq.write_table(pa.table(columns), Path(out) / f"{stem}.parquet")
        del rows, columns
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": _peak_rss_mb()}))


def _run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[2_200_000], help="training items (one run each)")
    parser.add_argument("--test-items", type=int, help="test items (default 0.44 x items)")
    parser.add_argument("--labels", type=int, default=1_300_000)
    parser.add_argument("--labels-per-item", type=int, default=5)
    parser.add_argument("--batch-rows", type=int, default=65536, help="data.write_batch_rows")
    parser.add_argument("--filters", default="none", choices=("none", "self_reciprocal"))
    parser.add_argument("--plain", action="store_true", help="also run the plain in-memory way")
    parser.add_argument("--workdir", help="where to write (default: a temporary folder, removed at the end)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-plain", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.child:
        _child_prepare(*args.child, overrides)
        return {}
    if args.child_plain:
        _child_plain(*args.child_plain)
        return {}

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prepare_scale-"))
    runs = []
    try:
        for items in args.items:
            test_items = args.test_items or round(0.44 * items)
            topics = -(-args.labels // NUM_ATTRIBUTES)
            cfg = load_config(None, [f"data.synthetic.num_train={items}", f"data.synthetic.num_test={test_items}",
                                     f"data.synthetic.num_topics={topics}",
                                     f"data.synthetic.num_attributes={NUM_ATTRIBUTES}",
                                     f"data.synthetic.labels_per_item={args.labels_per_item}"])
            raw, out = workdir / f"raw-{items}", workdir / f"dataset-{items}"
            gen = generate_synthetic(str(raw), cfg, fmt="xc", overwrite=True)
            shutil.rmtree(out, ignore_errors=True)
            child = _run_child("--child", str(raw), str(out), f"data.write_batch_rows={args.batch_rows}",
                               f"data.filters={args.filters}")
            run = {
                "items": items, "test_items": test_items, "labels": gen["counts"]["labels"],
                "labels_per_item": args.labels_per_item, "raw_mb": round(sum(
                    f.stat().st_size for f in raw.iterdir()) / 2**20, 1),
                "generate_s": gen["seconds"], "prepare_s": child["seconds"],
                "items_per_s": round((items + test_items) / child["seconds"]),
                "peak_rss_mb": child["peak_rss_mb"],
                "dataset_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
            }
            shutil.rmtree(out, ignore_errors=True)
            if args.plain:
                plain = _run_child("--child-plain", str(raw), str(out))
                run.update(plain_s=plain["seconds"], plain_peak_rss_mb=plain["peak_rss_mb"],
                           rss_ratio_vs_plain=round(run["peak_rss_mb"] / plain["peak_rss_mb"], 3),
                           time_ratio_vs_plain=round(run["prepare_s"] / plain["seconds"], 3))
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(raw, ignore_errors=True)
            print(json.dumps(run), flush=True)
            runs.append(run)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"runs": runs}
    if len(runs) > 1:
        result["rss_growth"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        result["item_growth"] = round(runs[-1]["items"] / runs[0]["items"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
