"""The jobs of vixml-ray and their one contract: ``vixml-ray <job> [--config PRESET] [flags] [key=value ...]``
(``jobs/<job>.py`` runs the same).

Every job takes ``--config`` (a preset name or YAML file) and dotted ``key=value`` overrides, logs to stderr and
prints its summary as the last line of stdout (one JSON object). The config is validated and the input paths the job
was given are checked before anything else runs (no Ray yet). A user error (:class:`~vixml_ray.errors.VixmlError`:
bad config, missing or malformed input, artifacts that do not belong together) exits with status 2 and one line
``error: ...`` on stderr naming the key, path or file:line; anything else is a bug and exits 1 with its traceback.

Each job is one function calling its library entry point, imported lazily: ``vixml-ray --help`` and a bad config do
not import torch or start Ray. This module is the package's top layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vixml_ray import storage
from vixml_ray.config import Config, check_overrides, load_config, replace
from vixml_ray.errors import ConfigError, VixmlError

Summary = dict[str, Any]
Flag = tuple[tuple[str, ...], dict[str, Any]]  # the arguments of one ``add_argument`` call


@dataclass(frozen=True)
class Job:
    """One job: its flags, the flags that name inputs (checked to exist before it runs) and its function."""

    name: str
    doc: str  # usage and description (the first line is the summary in ``vixml-ray --help``)
    flags: tuple[Flag, ...]
    run: Callable[[argparse.Namespace, Config], Summary]
    inputs: tuple[str, ...] = ()  # argument names whose paths/URIs must exist
    data_inputs: bool = False  # the job prepares data.dataset from data.source when needed (both checked)
    export_config: bool = False  # the config defaults to the one of the export given by --checkpoint
    default_config: str | None = None

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0].removeprefix(f"{self.name}: ")


JOBS: dict[str, Job] = {}


def flag(*names: str, **kwargs: Any) -> Flag:
    """One ``add_argument`` call of a job's parser."""
    return names, kwargs


def job(doc: str, *flags: Flag, inputs: Sequence[str] = (),
        data_inputs: bool = False, export_config: bool = False, default_config: str | None = None) -> Callable:
    """Registers the decorated ``fn(args, cfg) -> summary`` as the job named like it."""

    def register(fn: Callable[[argparse.Namespace, Config], Summary]) -> Callable:
        JOBS[fn.__name__] = Job(fn.__name__, doc, tuple(flags), fn, tuple(inputs), data_inputs, export_config,
                                default_config)
        return fn

    return register


# ------------------------------------------------------------------------------------------------------ contract
def job_config(spec: Job, args: argparse.Namespace) -> Config:
    """The job's validated config; the input paths are checked after the config, before anything reads them."""
    if spec.export_config:
        # the export's own config is read only once the overrides (and a --config preset) are known to be valid
        if args.config:
            load_config(args.config, args.overrides)
        else:
            check_overrides(args.overrides)
        check_inputs(spec, args)
        from vixml_ray.inference.export import job_config as export_job_config

        return export_job_config(args.checkpoint, args.config, args.overrides)
    cfg = load_config(args.config, args.overrides)
    check_inputs(spec, args)
    if spec.data_inputs:
        from vixml_ray.pipeline import check_data_inputs

        check_data_inputs(cfg)
    return cfg


def check_inputs(spec: Job, args: argparse.Namespace) -> None:
    """Every input path or URI given on the command line exists."""
    for name in spec.inputs:
        value = getattr(args, name)
        if value:
            storage.require(value, f"--{name.replace('_', '-')}")


def job_parser(spec: Job, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The job's flags (added to ``parser``, e.g. a ``vixml-ray`` subcommand, or to a new parser)."""
    parser = parser or argparse.ArgumentParser(prog=f"vixml-ray {spec.name}", description=spec.doc,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    config_help = ("preset name or YAML file (default: the export's config)" if spec.export_config
                   else f"preset name or YAML file (default: {spec.default_config or 'the schema defaults'})")
    parser.add_argument("--config", default=spec.default_config, help=config_help)
    for names, kwargs in spec.flags:
        parser.add_argument(*names, **kwargs)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=3")
    return parser


def execute(spec: Job, args: argparse.Namespace) -> Summary:
    """The job with parsed arguments: config, input checks, then its library function."""
    return spec.run(args, job_config(spec, args))


def run(name: str, argv: Sequence[str]) -> Summary:
    """Runs the job ``name`` with command-line arguments ``argv``; returns its summary (errors propagate)."""
    spec = JOBS[name]
    return execute(spec, job_parser(spec).parse_args(list(argv)))


def run_job(main: Callable[[], Summary]) -> None:
    """Runs ``main`` under the contract: logging to stderr, the summary as the last stdout line (JSON), a user error
    as one ``error: ...`` line and exit status 2; any other exception propagates (traceback, status 1)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = main()
    except VixmlError as err:
        cause = getattr(err, "cause", None)  # a Ray task error carries the worker's exception (and its traceback)
        message = str(cause if isinstance(cause, VixmlError) else err)
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps(summary, sort_keys=True, default=float), flush=True)


def job_main(name: str) -> None:
    """The body of ``jobs/<name>.py``: the job with this process's command-line arguments."""
    run_job(lambda: run(name, sys.argv[1:]))


def main(argv: Sequence[str] | None = None) -> None:
    """``vixml-ray <job> ...`` (the console entry point)."""
    parser = argparse.ArgumentParser(
        prog="vixml-ray", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ViXML multimodal extreme multi-label classification on Ray.",
        epilog="Run 'vixml-ray JOB --help' for a job's flags. Exit status: 0 done (the last stdout line is a JSON "
               "summary), 2 bad config or input (one 'error:' line), 1 a bug (traceback).")
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for spec in JOBS.values():
        job_parser(spec, jobs.add_parser(spec.name, help=spec.summary, description=spec.doc,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    run_job(lambda: execute(JOBS[args.job], args))


# ---------------------------------------------------------------------------------------------------------- jobs
@job("""prepare_data: a raw Extreme Classification Repository folder (or synthetic data) -> a dataset directory.

    vixml-ray prepare_data --source DIR --out DIR [--config FILE] [--overwrite] [key=value ...]
    vixml-ray prepare_data --synthetic --out DIR [--format dataset|xc] [--config FILE] [key=value ...]

``--source``/``--out`` default to ``data.source``/``data.dataset`` of the config. A malformed input line fails with
its file and line. Prints one JSON line: counts and the output path.
""",
     flag("--source", help="raw XC folder (default: data.source)"),
     flag("--out", help="output directory or URI (default: data.dataset)"),
     flag("--overwrite", action="store_true", help="replace an existing output"),
     flag("--synthetic", action="store_true", help="generate synthetic data (data.synthetic.*)"),
     flag("--format", choices=("dataset", "xc"), default="dataset",
          help="synthetic output: a prepared dataset with images, or raw XC files"),
     inputs=("source",))
def prepare_data(args: argparse.Namespace, cfg: Config) -> Summary:
    out = args.out or cfg.data.dataset
    if not out:
        raise ConfigError("no output: pass --out or set data.dataset")
    if args.synthetic:
        from vixml_ray.data import generate_synthetic

        return generate_synthetic(out, cfg, fmt=args.format, overwrite=args.overwrite)
    source = args.source or cfg.data.source
    if not source:
        raise ConfigError("no input: pass --source, set data.source, or use --synthetic")
    from vixml_ray.data import prepare_dataset

    return prepare_dataset(source, out, cfg, overwrite=args.overwrite)


@job("""embed_images: embeds a prepared dataset's images with a frozen vision tower into its feature cache (Ray Data).

    vixml-ray embed_images --dataset DIR [--config FILE] [key=value ...]
    vixml-ray embed_images --dataset DIR --import-vixml RELEASE_DIR   # ViXML's released arrays / img_urls

Resumable: a re-run embeds only the shards the cache lacks. Prints progress, then a one-line JSON summary (images,
failures by reason, images/s, output directory).
""",
     flag("--dataset", required=True, help="prepared dataset directory (local path or URI)"),
     flag("--import-vixml", metavar="DIR", default=None,
          help="import ViXML's released image arrays and/or img_urls.parquet from DIR instead"),
     flag("--no-progress", action="store_true", help="no progress bar"),
     inputs=("dataset", "import_vixml"))
def embed_images(args: argparse.Namespace, cfg: Config) -> Summary:
    if args.import_vixml:
        from vixml_ray.vision.vixml_import import import_vixml

        return import_vixml(args.dataset, args.import_vixml, cfg)
    from vixml_ray.vision.pipeline import embed_images as embed

    return embed(cfg, args.dataset, progress=not args.no_progress)


@job("""train: fine-tune the ViXML embedder on Ray Train (DDP or DeepSpeed ZeRO-2/3).

    vixml-ray train --config tiny [--run-name NAME] [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config tiny

Starts a private local Ray on 127.0.0.1 unless RAY_ADDRESS (or ray.address) names a cluster. Running the same
config and run name again resumes from the newest checkpoint. Rank 0 logs a progress line every
``train.progress_every_s`` seconds. Last line: JSON with the inference export's path (``checkpoint``), first/final
loss, samples/s and the validation/test metrics.
""",
     flag("--run-name", default="train", help="Ray Train run name (same name = resume)"), data_inputs=True)
def train(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.pipeline import run_training

    return run_training(cfg, run_name=args.run_name)


@job("""sweep: Ray Tune over training choices with ASHA on the validation metric; every trial is a Ray Train run.

    vixml-ray sweep --config sweep-tiny [key=value ...]
    vixml-ray sweep --config tiny tune.presets=[prompt] tune.name=prompts train.num_workers=1

Sweeps prompt template, image position, #images, LoRA, learning rates, margin, cluster curriculum. Starts a private
local Ray on 127.0.0.1 unless RAY_ADDRESS (or ray.address) names a cluster. Running the same command again resumes
an interrupted sweep (Tuner.restore) without rerunning finished trials. Writes
<ray.storage_path or out_dir>/<tune.name>/report/: results.csv, results.md, trials.png and best.yaml (the best trial's
full config, for the train job). Last line: JSON with trials, early_stopped, best_metric, best_config, ...
""", data_inputs=True)
def sweep(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.tune.sweep import run_sweep

    return run_sweep(cfg)


@job("""refresh_labels: embed a dataset's labels with a trained export into a new index version and make it current.

    vixml-ray refresh_labels --checkpoint EXPORT_DIR --dataset DIR --out INDEX_DIR [--incremental]
                             [--config FILE] [key=value ...]

The config defaults to the export's own (``--config`` replaces it; model, prompt and vision tower must stay the
export's). ``--incremental`` re-embeds only labels whose text or image features changed since the current version
(same export) and carries the others over. ``infer.raa.enabled=true`` also embeds every training query into the same
version (the memory of retrieval-augmented inference; carried over the same way). Prints one JSON line: labels,
embedded, carried, labels_per_s, queries, version, out.
""",
     flag("--checkpoint", required=True, help="inference export directory of a training run"),
     flag("--dataset", required=True, help="prepared dataset directory (local path or URI)"),
     flag("--out", required=True, help="index directory (local path or URI)"),
     flag("--incremental", action="store_true", help="re-embed only new or changed labels"),
     inputs=("checkpoint", "dataset"), export_config=True)
def refresh_labels(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.index.refresh import refresh_labels as refresh

    return refresh(args.checkpoint, args.dataset, args.out, cfg, incremental=args.incremental)


@job("""evaluate: P@k, nDCG@k, PSP@k, PSnDCG@k and R@k of a trained export on a dataset's test split.

    vixml-ray evaluate --checkpoint EXPORT_DIR --dataset DIR [--index INDEX_DIR] [--out DIR] [--overwrite]
                       [--config FILE] [key=value ...]

Embeds the test queries (Ray Data), retrieves the top ``eval.topk`` labels from the sharded index (``--index``, or
a fresh label refresh into a temporary index), removes the dataset's filter pairs from the predictions and writes
metrics.json, metrics.md, metrics.png and predictions.parquet to ``--out`` (default ``<out_dir>/eval``). The config
defaults to the export's own. ``infer.raa.enabled=true`` makes the predictions retrieval-augmented (the index must
then hold the training queries: refresh it with the same override). Prints one JSON line: the headline metrics and
the output directory.
""",
     flag("--checkpoint", required=True, help="inference export directory of a training run"),
     flag("--dataset", required=True, help="prepared dataset directory (local path or URI)"),
     flag("--index", help="index directory to query (default: refresh into a temporary one)"),
     flag("--out", help="output directory (default: <out_dir>/eval)"),
     flag("--overwrite", action="store_true", help="replace an existing output"),
     inputs=("checkpoint", "dataset", "index"), export_config=True)
def evaluate(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.eval.evaluate import evaluate as run_evaluation

    out = args.out or storage.join(cfg.out_dir, "eval")
    return run_evaluation(args.checkpoint, args.dataset, out, index_dir=args.index, cfg=cfg,
                          overwrite=args.overwrite)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@job("""predict: the online predictor over a JSONL file of raw queries (text + images).

    vixml-ray predict --checkpoint EXPORT_DIR --index INDEX_DIR --queries FILE.jsonl --out FILE.jsonl
                      [--k 10] [--overwrite] [--config FILE] [key=value ...]

Each input line is ``{"id": ..., "text": "...", "images": ["path, URI or URL", {"b64": "..."}]}``; each output line
holds the top-k label ids, names and scores and the index version that answered (see vixml_ray.predict.jsonl). A line
that is not a valid query gets an error record naming file and line, and is counted (the job goes on).
``infer.raa.enabled=true`` scores retrieval-augmented, as evaluate does (the index must hold the training queries).
Prints one JSON line: queries, predicted, skipped, queries_per_s, out.
""",
     flag("--checkpoint", required=True, help="inference export directory of a training run"),
     flag("--index", required=True, help="index directory written by refresh_labels"),
     flag("--queries", required=True, help="JSONL file of queries (local path or URI)"),
     flag("--out", required=True, help="JSONL file of predictions (local path or URI)"),
     flag("--k", type=_positive, default=10, help="labels per query (default 10)"),
     flag("--overwrite", action="store_true", help="replace an existing output"),
     inputs=("checkpoint", "index", "queries"), export_config=True)
def predict(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.predict.jsonl import predict_file

    return predict_file(args.checkpoint, args.index, args.queries, args.out, k=args.k, cfg=cfg,
                        overwrite=args.overwrite)


@job("""demo: the whole pipeline end to end on the built-in default (what ``make demo`` runs).

    vixml-ray demo [--config demo] [key=value ...]

Synthetic multimodal data -> embed_images -> train text-only and text+image -> refresh_labels -> evaluate, on a
private local Ray. Prints a table comparing the two (P@1, P@5, PSP@5, train time) and the path of a PNG with the
same comparison; the last line is JSON: {"text_only": {...}, "text_image": {...}, "plot": PATH} (percent).
""", data_inputs=True, default_config="demo")
def demo(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.demo import run_demo

    return run_demo(cfg)


@job("""serve: the online scoring service (Ray Serve) over a label index, until interrupted.

    vixml-ray serve --checkpoint EXPORT_DIR --index INDEX_DIR [--port 8000] [--config FILE] [key=value ...]

Starts a private local Ray on 127.0.0.1 (or joins RAY_ADDRESS), deploys vixml_ray.serve.app (FastAPI ingress,
batched query encoder, one deployment per index shard), prints {"url": ...} as a JSON line once it answers, and
serves until Ctrl-C or SIGTERM; then it deletes the application and stops Serve. The service follows the index's
CURRENT version (serve.poll_interval_s). Settings: the serve.* section of the config (vixml_ray/config.py), e.g.
serve.shard_replicas=2 serve.api_key_env=VIXML_API_KEY. The same app runs under the Serve CLI:
``serve run vixml_ray.serve.app:build checkpoint=EXPORT_DIR index=INDEX_DIR``.
""",
     flag("--checkpoint", required=True, help="inference export directory of a training run"),
     flag("--index", required=True, help="index directory written by refresh_labels"),
     flag("--port", type=_positive, help="HTTP port (default: serve.port)"),
     inputs=("checkpoint", "index"), export_config=True)
def serve(args: argparse.Namespace, cfg: Config) -> Summary:
    from vixml_ray.serve.run import serve_until_stopped

    if args.port:
        cfg = replace(cfg, **{"serve.port": args.port})
    return serve_until_stopped(cfg, args.checkpoint, args.index)


if __name__ == "__main__":
    main()
