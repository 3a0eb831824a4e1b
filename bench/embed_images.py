"""Image embedding throughput: the Ray Data pipeline against the strongest plain way, same images, model, batch
size and CPUs.

(a) pipeline: ``embed_images`` (decode tasks + one embedding actor) in steady state;
(b) plain DataLoader loop (the baseline, ``ratio``): a ``torch.utils.data.DataLoader`` over the image files with
    ``cores - 1`` worker processes (at least 1) that read, decode and preprocess whole batches, prefetching on, feeding
    the model in this process with all cores: what ViXML's own extraction script does (12 workers there);
(c) plain serial loop (a second, labelled figure, ``serial_ratio``): read, decode, preprocess and embed one batch
    after another in this process, no overlap;
(d) the forward alone on the pre-decoded tensors of (c) (the model-only ceiling), and the per-image decode and model
    costs.

One clock rule for all three: a rate counts the images after the first output batch, from the moment that batch was
done (start-up, model load and the first batch are excluded alike); the pipeline's start-up is reported apart as
``startup_s``. On 2 cores decode and the model share the same two CPUs whichever way they are scheduled, so (a) and
(b) can at best match the model-only ceiling; on a GPU node the model leaves the CPUs to decode and the pipeline's
decode tasks spread over every node's CPUs, which one process's DataLoader cannot.

The images are JPEG "photos" of ``--image-px`` pixels (smooth random colour fields plus noise, quality 90); the
tower is a random-init open_clip architecture. The defaults, the smallest SigLIP2 tower (ViT-B-32-SigLIP2-256, 256 px
input) on 1500 px photos (a catalogue's hi-res size), put the model at about 3/4 of the per-image cost on a CPU.
Prints one JSON line last, with ``ratio`` = pipeline / DataLoader loop. ``--quick`` finishes in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from vixml_ray.config import Config, load_config
from vixml_ray.data import schema
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.ray_utils import init_ray
from vixml_ray.vision.decode import decode_rgb
from vixml_ray.vision.pipeline import embed_images
from vixml_ray.vision.towers import load_preprocessor, load_tower


def photo(px: int, noise: np.ndarray, rng: np.random.Generator) -> bytes:
    """A smooth random colour field plus fine noise (a random shift of ``noise``), as JPEG bytes: it decodes like a
    catalogue photo."""
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((px, px), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + np.roll(noise, tuple(rng.integers(0, px, 2)), axis=(0, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: str, n_images: int, px: int, seed: int) -> list[str]:
    """A prepared dataset whose image manifest lists ``n_images`` JPEGs (3 per training item); returns their paths."""
    cfg = load_config(None, [f"data.synthetic.num_train={-(-n_images // 3)}", "data.synthetic.num_test=1",
                             "data.synthetic.num_topics=1", "data.synthetic.image_size=8",
                             f"data.synthetic.seed={seed}"])
    generate_synthetic(root, cfg, overwrite=True)
    rng = np.random.default_rng(seed)
    noise = np.rint(rng.normal(0, 8, (px, px, 3))).astype(np.int16)
    os.makedirs(os.path.join(root, "bench"), exist_ok=True)
    rows = []
    for i in range(n_images):
        rel = f"bench/{i:06d}.jpg"
        with open(os.path.join(root, rel), "wb") as f:
            f.write(photo(px, noise, rng))
        rows.append({"split": "train", "row": i // 3, "uid": f"trn{i // 3}", "slot": i % 3, "uri": rel})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.IMAGES_SCHEMA), os.path.join(root, schema.IMAGES_FILE))
    return [os.path.join(root, r["uri"]) for r in rows]


class Rate:
    """Images per second after the first output batch (the clock rule shared with the pipeline)."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0

    def timed(self, batches: Iterator[int]) -> None:
        started = None
        for n in batches:
            if started is None:
                started = time.perf_counter()
                continue
            self.images += n
        if started is not None:
            self.seconds += time.perf_counter() - started

    @property
    def per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class DecodedFiles(torch.utils.data.Dataset):
    """The image files as decoded RGB images (one file per item; a batch is preprocessed by the worker's collate)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        with open(self.paths[i], "rb") as f:
            return decode_rgb(f.read()).image


class PlainLoops:
    """(b), (c) and (d) in this process with all cores. Each runs in two halves, before and after the pipeline, so
    that a change in the machine's load affects every measurement alike."""

    def __init__(self, cfg: Config, batch_size: int, cores: int):
        torch.set_num_threads(cores)
        self.tower, self.preprocess = load_tower(cfg.vision), load_preprocessor(cfg.vision)
        self.batch_size = batch_size
        self.workers = max(1, cores - 1)
        self.loader_rate, self.serial_rate = Rate(), Rate()
        self.serial_images = 0
        self.decode_s = self.model_s = 0.0

    def _decode(self, paths: list[str]) -> dict[str, np.ndarray]:
        files = DecodedFiles(paths)
        return self.preprocess([files[i] for i in range(len(files))])

    def _loader_batches(self, paths: list[str]) -> Iterator[int]:
        loader = torch.utils.data.DataLoader(DecodedFiles(paths), batch_size=self.batch_size,
                                             num_workers=self.workers, collate_fn=self.preprocess,
                                             prefetch_factor=2, persistent_workers=False)
        for inputs in loader:
            self.tower.embed(inputs)
            yield len(next(iter(inputs.values())))

    def _serial_batches(self, paths: list[str]) -> Iterator[int]:
        for lo in range(0, len(paths), self.batch_size):
            t0 = time.perf_counter()
            inputs = self._decode(paths[lo: lo + self.batch_size])
            t1 = time.perf_counter()
            self.tower.embed(inputs)
            self.decode_s += t1 - t0
            self.model_s += time.perf_counter() - t1
            self.serial_images += len(paths[lo: lo + self.batch_size])
            yield len(paths[lo: lo + self.batch_size])

    def run(self, paths: list[str]) -> None:
        self.loader_rate.timed(self._loader_batches(paths))
        self.serial_rate.timed(self._serial_batches(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images: finishes within a minute on 2 cores")
    parser.add_argument("--images", type=int, default=None, help="default 512 (--quick: 128)")
    parser.add_argument("--model", default="ViT-B-32-SigLIP2-256", help="open_clip architecture (random weights)")
    parser.add_argument("--tower-size", type=int, default=None, help="tower input size (default: the model's)")
    parser.add_argument("--image-px", type=int, default=1500,
                        help="side of the source JPEGs (1500: a catalogue's hi-res product photo)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decode-batch-size", type=int, default=4)
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="torch threads of the embedding actor (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_images = args.images or (128 if args.quick else 512)
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="vixml-bench-embed-")
    root = os.path.join(work, "dataset")
    paths = make_dataset(root, n_images, args.image_px, args.seed)
    overrides = [
        f"cache_dir={work}/cache", "vision.backend=open_clip", f"vision.model_name={args.model}",
        f"vision.batch_size={args.batch_size}", f"vision.decode_batch_size={args.decode_batch_size}",
        f"vision.rows_per_shard={max(args.batch_size, n_images // 4)}", "vision.decode_num_cpus=0.5",
        f"vision.num_cpus_per_actor={cores - 0.5}", f"vision.actor_threads={args.actor_threads or cores}",
    ]
    if args.tower_size:
        overrides.append(f"vision.image_size={args.tower_size}")
    cfg = load_config(None, overrides)

    t0 = time.perf_counter()
    init_ray(num_cpus=cores, local_only=True, include_dashboard=False)
    ray_start_s = time.perf_counter() - t0
    # The raylet starts workers at a lower priority (niceness 15 by default); the plain loop runs at the same one, so
    # that other load on the machine weighs on both alike.
    worker_niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    os.nice(max(0, worker_niceness - os.nice(0)))

    plain = PlainLoops(cfg, args.batch_size, cores)
    half = (n_images // 2 // args.batch_size) * args.batch_size
    plain.run(paths[:half])

    # Decoding starts once the actor has loaded the model: images decoded during its start-up would flatter the
    # steady-state rate (they would reach the model with no decode cost left).
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    summary = embed_images(cfg, root, progress=False)
    assert summary["embedded"] == n_images, summary

    plain.run(paths[half:])
    plain_rate, serial_rate = plain.loader_rate.per_s, plain.serial_rate.per_s
    decode_ms, model_ms = 1000 * plain.decode_s / plain.serial_images, 1000 * plain.model_s / plain.serial_images
    result = {
        "model": args.model, "tower_size": plain.preprocess.image_size, "image_px": args.image_px,
        "images": n_images, "batch_size": args.batch_size, "cores": cores,
        "pipeline_images_per_s": round(summary["steady_images_per_s"], 2),
        "startup_s": round(ray_start_s + summary["first_output_s"], 2),
        "plain_images_per_s": round(plain_rate, 2), "plain_workers": plain.workers,
        "serial_images_per_s": round(serial_rate, 2),
        "model_only_images_per_s": round(1000 / model_ms, 2),
        "decode_ms_per_image": round(decode_ms, 1),
        "model_ms_per_image": round(model_ms, 1),
        "model_share": round(model_ms / (model_ms + decode_ms), 3),
        "ratio": round(summary["steady_images_per_s"] / plain_rate, 3),
        "serial_ratio": round(summary["steady_images_per_s"] / serial_rate, 3),
        "ceiling_ratio": round(summary["steady_images_per_s"] / (1000 / model_ms), 3),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
