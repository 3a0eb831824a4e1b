"""Runs every benchmark's quick mode in sequence and writes one markdown table of their JSON lines.

    python bench/run_all.py [--only NAME ...] [--out bench/RESULTS.md] [--readme]   (= make bench)

Each bench runs as its own process (one at a time, so they do not share the machine) and ends with one JSON line;
the table shows each one's headline figures (its ratios against its plain side, and the quality figures) and the
whole line. The runs are also kept in ``bench/RESULTS.json`` (name -> command, seconds, JSON line, time): ``--only``
re-runs some benches and the table keeps the other benches' last runs, each row dated. ``--readme`` also replaces
the table between the ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers of README.md, so the README's
figures are regenerated, never retyped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (arguments of its quick mode, the keys shown as headline figures)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "prepare_scale": (["--items", "200000", "--labels", "130000", "--plain"],
                      ["prepare_s", "peak_rss_mb", "time_ratio_vs_plain", "rss_ratio_vs_plain"]),
    "embed_images": (["--quick"], ["ratio", "serial_ratio", "ceiling_ratio", "pipeline_images_per_s",
                                   "plain_images_per_s"]),
    "cluster": (["--quick"], ["seconds", "peak_rss_gb"]),
    "train": (["--quick"], ["ratio", "ratio_std", "ray_samples_per_s", "plain_samples_per_s"]),
    "fusion": (["--quick"], ["text_only_p1", "text_image_p1", "shuffled_image_p1", "popularity_p1"]),
    "index": (["--quick"], ["ratio", "identical", "refresh_ratio"]),
    "serve": (["--quick"], ["qps_ratio", "single_qps_ratio", "c1_overhead_ms", "p50_ms", "p99_ms", "errors",
                            "swap_errors"]),
    "scale": (["--quick"], ["refresh_ratio", "incremental_fraction", "max_rss_gb"]),
    "quality": (["--dataset", "{cooking}", "--preset", "minilm-cpu", "--minutes", "2", "--seeds", "1",
                 "--variants", "plain", "prototypes"],
                ["plain", "prototypes", "prototypes_raa"]),
}


def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def headline(result: dict[str, Any], keys: list[str]) -> str:
    """``key value`` pairs of the keys a bench puts first (nested ones flattened one level: ``refresh.ratio``)."""
    flat = dict(result)
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1]  # e.g. prepare_scale's runs: the largest
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
    shown = []
    for key in keys:
        matches = [k for k in flat if k == key or k.endswith("." + key)]
        for k in matches:
            value = flat[k]
            if isinstance(value, dict) and "P@1" in value:  # a quality variant: metrics +- their spread, its cost
                parts = [f"{n} {value[n]} +- {value.get(n + '_std', 0)}" for n in ("P@1", "P@5", "PSP@5") if n in value]
                if "train_side_s" in value:
                    parts.append(f"train_side_s {value['train_side_s']}")
                value = ", ".join(parts)
            elif isinstance(value, dict):
                value = ", ".join(f"{n} {v}" for n, v in value.items() if not isinstance(v, (dict, list)))
            shown.append(f"{k} {value}")
    return "; ".join(shown)


def prepare_cooking(workdir: str) -> str:
    out = os.path.join(workdir, "cooking")
    if not os.path.exists(out):
        subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--source",
                        str(SHARED_DATA / "cooking_stackexchange"), "--out", out], check=True, cwd=ROOT)
    return out


def run(name: str, args: list[str], timeout_s: float) -> tuple[dict[str, Any] | None, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    result = last_json(proc.stdout) if proc.returncode == 0 else None
    error = "" if result is not None else (proc.stderr.strip().splitlines() or ["no JSON line"])[-1]
    return result, seconds, error


def table(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| bench | run | when (UTC) | s | headline | JSON line |", "|---|---|---|---:|---|---|"]
    for name in [n for n in BENCHES if n in runs]:
        run_ = runs[name]
        result = run_["result"]
        text = headline(result, BENCHES[name][1]) if result is not None else f"FAILED: {run_['error']}"
        whole = json.dumps(result, sort_keys=True) if result is not None else ""
        lines.append(f"| `{name}` | `{run_['command']}` | {run_['when']} | {run_['seconds']:.0f} | {text} | "
                     f"<details>`{whole}`</details> |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benches")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown table to write")
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's bench table")
    parser.add_argument("--timeout-min", type=float, default=30.0, help="per bench")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="vixml-bench-all-")
    kept = Path(args.out).with_suffix(".json")
    runs: dict[str, dict[str, Any]] = json.loads(kept.read_text()) if args.only and kept.exists() else {}
    for name in args.only or list(BENCHES):
        bench_args = list(BENCHES[name][0])
        if "{cooking}" in bench_args:
            bench_args[bench_args.index("{cooking}")] = prepare_cooking(workdir)
        command = " ".join([f"bench/{name}.py", *(a if not a.startswith(workdir) else "<cooking>" for a in bench_args)])
        print(f"[run_all] {command}", flush=True)
        result, seconds, error = run(name, bench_args, args.timeout_min * 60)
        print(f"[run_all] {name}: {seconds:.0f} s {json.dumps(result) if result is not None else error}", flush=True)
        runs[name] = {"command": command, "seconds": round(seconds, 1), "result": result, "error": error,
                      "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    kept.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    text = (f"Quick modes of every bench, run one at a time by `bench/run_all.py` on {os.cpu_count()} CPUs.\n\n"
            + table(runs))
    Path(args.out).write_text(text)
    if args.readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        if BEGIN not in body or END not in body:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
        head, rest = body.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    print(json.dumps({"out": args.out, "failed": [name for name, r in runs.items() if r["result"] is None]}),
          flush=True)


if __name__ == "__main__":
    main()
