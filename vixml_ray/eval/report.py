"""Human-readable evaluation reports: a markdown table and a PNG (metrics at k = 1..K, P@K by label decile).

Reads the result dictionary :func:`vixml_ray.eval.evaluate.evaluate` writes to ``metrics.json`` (``k``, ``at_k``,
``deciles``, ``counts``, ``index``, ``raa``); values are fractions there and percentages here.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure

from vixml_ray import storage

MARKDOWN_FILE, PLOT_FILE = "metrics.md", "metrics.png"
ORDER = ("P", "nDCG", "PSP", "PSnDCG", "R")


def markdown(result: dict[str, Any]) -> str:
    """A markdown table of every metric at 1..k and one of P@k by training-frequency decile."""
    k, at_k = result["k"], result["at_k"]
    names = [n for n in ORDER if n in at_k]
    counts = result["counts"]
    raa = result.get("raa") or {}
    inference = (f"retrieval-augmented (lam {raa['lam']}, temperature {raa['temperature']}, {raa['neighbors']} "
                 "training-query neighbours)" if raa.get("enabled") else "plain label search")
    lines = [
        "# Evaluation",
        "",
        f"{counts['queries']} test queries, {counts['labels']} labels, top {counts['topk']} retrieved by "
        f"{inference}, {counts['filter_pairs']} filter pairs removed from the predictions; index version "
        f"{result['index']['version']}. Values in %.",
        "",
        "| metric | " + " | ".join(f"@{j}" for j in range(1, k + 1)) + " |",
        "|---|" + "---:|" * k,
        *(f"| {n} | " + " | ".join(f"{100 * v:.2f}" for v in at_k[n]) + " |" for n in names),
        "",
        f"## P@{k} by label-frequency decile (1 = most frequent labels in training; deciles sum to P@{k})",
        "",
        f"| decile | labels | training count | P@{k} |",
        "|---:|---:|---|---:|",
        *(f"| {d['decile']} | {d['labels']} | {d['min_count']}..{d['max_count']} | {100 * d[f'P@{k}']:.2f} |"
          for d in result["deciles"]),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> bytes:
    """PNG bytes: metrics at k = 1..K (left), each decile's contribution to P@K (right)."""
    k, at_k = result["k"], result["at_k"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    ks = list(range(1, k + 1))
    for name in (n for n in ORDER if n in at_k):
        left.plot(ks, [100 * v for v in at_k[name]], marker="o", label=name)
    left.set(xlabel="k", ylabel="%", xticks=ks, title="metrics at k")
    left.grid(alpha=0.3)
    left.legend()
    deciles = result["deciles"]
    right.bar([d["decile"] for d in deciles], [100 * d[f"P@{k}"] for d in deciles], color="tab:blue")
    right.set(xlabel="label decile by training frequency (1 = most frequent)", ylabel=f"contribution to P@{k} (%)",
              xticks=[d["decile"] for d in deciles], title=f"P@{k} by label-frequency decile")
    right.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(result: dict[str, Any], out_dir: str) -> list[str]:
    """Writes ``metrics.md`` and ``metrics.png`` into ``out_dir`` (local path or URI); returns their URIs."""
    md_uri, png_uri = storage.join(out_dir, MARKDOWN_FILE), storage.join(out_dir, PLOT_FILE)
    storage.write_text(md_uri, markdown(result))
    storage.write_bytes(png_uri, plot(result))
    return [md_uri, png_uri]
