"""Ray Train end to end on 2 CPU workers (tiny Qwen2 + LoRA + early image fusion, the ``tiny`` preset shrunk):
DDP, DeepSpeed ZeRO-2 and ZeRO-3 finish and learn; 1 and 2 workers compute the same losses on the same global
batches, and those are the golden losses pinned here; a run whose worker is SIGKILLed recovers from its last
checkpoint (FailureConfig) and a failed run re-run under the same name resumes, both repeating the uninterrupted run's
losses; under ZeRO-3 + LoRA the checkpoint and the inference export hold the trained adapter (equal to the live
gathered weights), not the frozen base; joint classifier training takes the 1-process steps on 2 workers.

A TorchTrainer costs ~35 s of start-up here, so the module runs seven (DDP, ZeRO-2 killed once, ZeRO-3, ZeRO-3 with
prototypes and classifiers, DDP with joint classifiers, and a DDP run killed without retries then re-run) and every
test reads them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vixml_ray import storage
from vixml_ray.config import Config, load_config, replace
from vixml_ray.pipeline import ensure_dataset
from vixml_ray.train.deepspeed_engine import CHECKPOINT_TAG
from vixml_ray.train.metrics_log import METRICS_FILE
from vixml_ray.train.ray_train import SUMMARY, RayTrainRuntime, make_engine, make_trainer, read_summary

pytestmark = pytest.mark.slow

EPOCHS = 4
TOLERANCE = 1e-5  # fp32, dropout off: the same maths up to summation order
# Golden losses of this shrunk tiny preset, measured (twice, identical) on 1 worker, DDP and ZeRO-3 on 2 workers:
# the first step's global-batch loss and the per-epoch mean losses. A change that moves them must be deliberate.
FIRST_LOSS = 1.026696801185608
EPOCH_LOSSES = [0.7853610846731398, 0.395478218793869, 0.2272479087114334, 0.12309396334669807]
PROBE_WEIGHTS, PROBE_INFO = "probe-live.safetensors", "probe-live.json"


def _config(root: Path) -> Config:
    return load_config("tiny", [
        f"out_dir={root / 'runs'}", f"cache_dir={root / 'cache'}",
        "data.synthetic.num_train=640", "data.synthetic.num_test=160",
        f"train.epochs={EPOCHS}", "train.num_to_keep=10", "train.max_failures=0"])


@dataclass
class Run:
    """One finished (or failed) Ray Train run and what it left in its run directory."""

    run_dir: Path
    result: Any = None  # ray.train.Result
    killed_pid: int | None = None
    error: BaseException | None = None  # what fit() raised

    @property
    def history(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / METRICS_FILE).read_text().splitlines()]

    @property
    def summary(self) -> dict[str, Any]:
        return read_summary(str(self.run_dir))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Optimiser step of every checkpoint Ray Train registered (restored ones included), in report order."""
        return [int(metrics["step"]) for _, metrics in self.result.best_checkpoints]


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker of this session as soon as the run has committed its first checkpoint (Ray
    Train writes ``checkpoint_manager_snapshot.json`` once every rank has reported it)."""

    def __init__(self, run_dir: Path, gcs_address: str):
        super().__init__(daemon=True)
        self.snapshot = run_dir / "checkpoint_manager_snapshot.json"
        self.gcs_address = gcs_address
        self.killed: int | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        from ray.util.state import list_actors

        while not self.stopped.wait(0.05):
            if not self.snapshot.exists():
                continue
            workers = list_actors(address=self.gcs_address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                     ("state", "=", "ALIVE")])
            if workers:
                self.killed = int(workers[-1].pid)
                os.kill(self.killed, signal.SIGKILL)
                return

    def __enter__(self) -> WorkerKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join()


def _fit(cfg: Config, name: str, kill: bool = False, trainer_fn: Any = None) -> Run:
    import ray

    trainer, run_dir = make_trainer(cfg, name)
    if trainer_fn is not None:  # the same trainer with another loop function
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(trainer_fn, train_loop_config=trainer.train_loop_config,
                               scaling_config=trainer.scaling_config, run_config=trainer.run_config,
                               torch_config=trainer.backend_config)
    run = Run(Path(run_dir))
    if not kill:
        run.result = trainer.fit()
        return run
    with WorkerKiller(run.run_dir, ray.get_runtime_context().gcs_address) as killer:
        try:
            run.result = trainer.fit()
        except Exception as err:  # noqa: BLE001 -- the caller asserts which failure it expects
            run.error = err
    run.killed_pid = killer.killed
    return run


def _zero3_probe(config: dict[str, Any]) -> None:
    """A TorchTrainer worker doing what the production one does (the loop with the Ray Train runtime and the
    configured engine, the summary and the curves), then rank 0 records what the engine holds live: each trainable
    parameter's LOCAL size (0 = partitioned away by ZeRO-3) and the weights ``trainable_state_dict`` gathers."""
    from vixml_ray.train.loop import build_trainer

    cfg: Config = config["cfg"]
    run_dir = config["run_dir"]
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    runtime = RayTrainRuntime(run_dir)
    try:
        trainer = build_trainer(cfg, runtime, make_engine)
        summary = trainer.run()
        embedder = trainer.engine.embedder
        local = {name: p.numel() for name, p in embedder.named_parameters() if p.requires_grad}
        frozen = sum(getattr(p, "ds_numel", p.numel()) for p in embedder.parameters() if not p.requires_grad)
        live = trainer.engine.trainable_state_dict()  # collective: every rank gathers
        if runtime.metrics_log is not None:  # rank 0
            storage.write_json(os.path.join(run_dir, SUMMARY), summary)
            runtime.metrics_log.plot()
            save_file({k: v.contiguous() for k, v in live.items()}, os.path.join(run_dir, PROBE_WEIGHTS))
            Path(run_dir, PROBE_INFO).write_text(json.dumps({"local_numel": local, "frozen_numel": frozen}))
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The shrunk tiny preset with its synthetic dataset and image features prepared once."""
    return ensure_dataset(_config(tmp_path_factory.mktemp("distributed")))


@pytest.fixture(scope="module")
def ddp(base: Config) -> Run:
    return _fit(base, "ddp")


@pytest.fixture(scope="module")
def zero2_killed(base: Config) -> Run:
    cfg = replace(base, **{"train.engine": "deepspeed", "train.zero_stage": 2, "train.max_failures": 1})
    return _fit(cfg, "zero2-killed", kill=True)


@pytest.fixture(scope="module")
def zero3(base: Config) -> Run:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    try:
        return _fit(replace(base, **{"train.engine": "deepspeed", "train.zero_stage": 3}), "zero3",
                    trainer_fn=_zero3_probe)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


PROTOTYPES = {"model.prototypes.enabled": True, "model.prototypes.num_clusters": 16, "model.prototypes.dropout": 0.0,
              "model.classifiers.enabled": True, "train.classifier_loss.epochs": 2,
              "train.classifier_loss.batch_size": 64, "train.classifier_loss.cluster_size": 8}


@pytest.fixture(scope="module")
def zero3_prototypes(base: Config) -> Run:
    return _fit(replace(base, **PROTOTYPES, **{"train.engine": "deepspeed", "train.zero_stage": 3}),
                "zero3-prototypes")


JOINT = {"model.classifiers.enabled": True, "train.classifier_loss.joint": True, "train.classifier_loss.epochs": 2,
         "train.classifier_loss.batch_size": 64, "train.classifier_loss.cluster_size": 8}


@pytest.fixture(scope="module")
def ddp_joint(base: Config) -> Run:
    return _fit(replace(base, **JOINT), "ddp-joint")


@pytest.fixture(scope="module")
def rerun(base: Config) -> tuple[Run, Run]:
    """A DDP run killed without retries (it fails), then the same config and run name again."""
    failed = _fit(base, "rerun", kill=True)
    return failed, _fit(base, "rerun")


def _assert_same_losses(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [h["epoch"] for h in got] == [h["epoch"] for h in want]
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=TOLERANCE), (g["epoch"], g["loss"], w["loss"])
        assert g["last_loss"] == pytest.approx(w["last_loss"], abs=TOLERANCE), g["epoch"]
        assert g["cluster_size"] == w["cluster_size"]


# --------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["ddp", "zero2_killed", "zero3"])
def test_two_worker_runs_finish_and_learn(name: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(name)
    assert run.result is not None and run.result.error is None
    history = run.history
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert [h["cluster_size"] for h in history] == [0, 0, 8, 16]  # random batches, then clusters of 8 and 16
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    summary = run.summary
    assert summary["final_loss"] < 0.5 * summary["first_loss"]
    assert summary["epochs"] == EPOCHS and summary["samples_per_s"] > 0
    assert "val_P@1" in summary and "test_P@5" in summary
    assert (Path(summary["checkpoint"]) / "trainable.safetensors").is_file()
    assert (run.run_dir / "curves.png").stat().st_size > 0
    assert any((run.run_dir / "tensorboard").iterdir())


def test_one_worker_matches_two_workers_and_the_golden_losses(base: Config, ddp: Run, zero3: Run,
                                                                tmp_path: Path) -> None:
    """The all-gathered loss of 2 workers is the 1-process loss of the same global batches (and so are the ZeRO
    engines'): the same loop on one worker in this process gives the same per-epoch losses, and all three give the
    golden first loss (same seeded weights, same global batch: every rank computes the whole batch's loss)."""
    from vixml_ray.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(base, run_dir=str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    one = [json.loads(line) for line in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    for first in (summary["first_loss"], ddp.summary["first_loss"], zero3.summary["first_loss"]):
        assert first == pytest.approx(FIRST_LOSS, abs=TOLERANCE)
    assert [h["loss"] for h in one] == pytest.approx(EPOCH_LOSSES, abs=TOLERANCE)
    _assert_same_losses(ddp.history, one)
    _assert_same_losses(zero3.history, one)
    assert ddp.summary["val_P@1"] == pytest.approx(one[-1]["val_P@1"], abs=0.5)


def test_prototypes_under_zero3_match_one_process(base: Config, zero3_prototypes: Run, tmp_path: Path) -> None:
    """PRIME prototypes (free vectors, combiner, per-epoch centroids) and the classifier stage keep the global-batch
    semantics under ZeRO-3: 2 workers give the 1-process losses and classifier vectors, and the export carries the
    trained prototypes."""
    from vixml_ray.model import load_export
    from vixml_ray.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(replace(base, **PROTOTYPES), run_dir=str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    one = [json.loads(line) for line in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    _assert_same_losses(zero3_prototypes.history, one)
    export = load_export(zero3_prototypes.summary["checkpoint"])
    assert export.prototypes is not None and bool(export.prototypes.has_centroid.all())
    assert float(export.prototypes.free.detach().abs().sum()) > 0
    alone = load_export(str(tmp_path / "one" / "export"))
    assert zero3_prototypes.summary["classifier_epochs"] == 2 and export.classifiers.trained.any()
    assert torch.equal(export.classifiers.trained, alone.classifiers.trained)
    torch.testing.assert_close(export.classifiers.weight, alone.classifiers.weight, atol=1e-4, rtol=1e-4)


def test_joint_classifiers_on_two_workers_match_one_process(base: Config, ddp_joint: Run, tmp_path: Path) -> None:
    """Joint training of the encoder and the classifier vectors (queries only encoded, the classifier loss of the
    whole global batch on every rank, the vectors replicated) takes on 2 DDP workers the 1-process steps: the same
    per-epoch losses and the same vectors in the export."""
    from vixml_ray.model import load_export
    from vixml_ray.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(replace(base, **JOINT), run_dir=str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    one = [json.loads(line) for line in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    assert summary["classifier_joint"] and one[-1]["loss"] < one[0]["loss"]
    _assert_same_losses(ddp_joint.history, one)
    both, alone = load_export(ddp_joint.summary["checkpoint"]), load_export(summary["checkpoint"])
    assert both.classifiers.trained.any() and torch.equal(both.classifiers.trained, alone.classifiers.trained)
    torch.testing.assert_close(both.classifiers.weight, alone.classifiers.weight, atol=1e-4, rtol=1e-4)


def test_rerun_after_a_failure_resumes_from_its_checkpoint(ddp: Run, rerun: tuple[Run, Run]) -> None:
    failed, again = rerun
    assert failed.killed_pid is not None and failed.result is None
    from ray.train import WorkerGroupError

    assert isinstance(failed.error, WorkerGroupError), failed.error
    assert again.result.error is None
    _assert_same_losses(again.history, ddp.history)
    # every checkpoint step once: the re-run started at the failed run's last checkpoint, not from scratch
    assert again.checkpoint_steps == [h["step"] for h in ddp.history]
    assert again.summary["final_loss"] == pytest.approx(ddp.summary["final_loss"], abs=TOLERANCE)
    assert again.summary["first_loss"] == pytest.approx(ddp.summary["first_loss"], abs=TOLERANCE)


def test_killed_worker_is_replaced_and_training_resumes(ddp: Run, zero2_killed: Run) -> None:
    run = zero2_killed
    assert run.killed_pid is not None, "no worker was killed"
    assert run.error is None and run.result.error is None
    with pytest.raises(ProcessLookupError):
        os.kill(run.killed_pid, 0)
    assert run.checkpoint_steps == [h["step"] for h in ddp.history]  # resumed, not restarted from scratch
    _assert_same_losses(run.history, ddp.history)


def test_zero3_lora_checkpoint_and_export_hold_the_trained_adapter(zero3: Run) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    live = load_file(str(zero3.run_dir / PROBE_WEIGHTS))
    info = json.loads((zero3.run_dir / PROBE_INFO).read_text())
    # the trap is armed: every trainable tensor is partitioned away locally (a naive save would write it empty)
    assert info["local_numel"] and all(n == 0 for n in info["local_numel"].values()), info["local_numel"]
    assert set(live) == set(info["local_numel"])
    assert all("lora_" in k or k.startswith("projection.") for k in live), sorted(live)
    assert all(v.numel() > 0 for v in live.values())
    assert all(v.abs().sum() > 0 for k, v in live.items() if "lora_B" in k)  # peft starts lora_B at zero

    export = load_file(os.path.join(zero3.summary["checkpoint"], "trainable.safetensors"))
    assert set(export) == set(live)
    for key, value in live.items():
        assert torch.equal(export[key], value), key

    with zero3.result.checkpoint.as_directory() as directory:
        saved = get_fp32_state_dict_from_zero_checkpoint(directory, tag=CHECKPOINT_TAG,
                                                         exclude_frozen_parameters=True)
        states = sorted(Path(directory, CHECKPOINT_TAG).glob("*_model_states.pt"))
        assert len(states) == 2  # one per rank, merged by Ray Train into one checkpoint
        for path in states:
            state = torch.load(path, map_location="cpu", weights_only=False)
            assert not state.get("frozen_param_shapes") and not state.get("frozen_param_fragments")
        stored = sum(f.stat().st_size for f in Path(directory, CHECKPOINT_TAG).iterdir())
    assert stored < 0.1 * 4 * info["frozen_numel"]  # a tenth of the frozen base's fp32 bytes at most
    assert {k.removeprefix("embedder.") for k in saved} == set(live)
    for key, value in saved.items():
        assert torch.equal(value, live[key.removeprefix("embedder.")]), key
