"""Publishing files and directories on local disk: they appear complete or not at all, and the first publisher of an
output wins unless overwriting."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vixml_ray import storage


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    storage.write_json(str(target), {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_file(str(target)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("boom")
    assert storage.read_json(str(target)) == {"v": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    storage.write_parquet(str(tmp_path / "t.parquet"), pa.table({"x": [1, 2]}), compression="zstd")
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [1, 2]


def test_publish_refuses_to_replace_an_output_published_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="published meanwhile"):
        with storage.publish(str(out)) as loser:
            Path(loser, "who").write_text("loser")
            with storage.publish(str(out)) as winner:  # another process finishes first
                Path(winner, "who").write_text("winner")
    assert (out / "who").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind
    with storage.publish(str(out), overwrite=True) as staging:
        Path(staging, "who").write_text("again")
    assert (out / "who").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
