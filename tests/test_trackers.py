"""trainer.loggers: TensorBoard, W&B (offline) and MLflow (file store) get every metrics row."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from helpers import compose_config, metrics
from hift_cli import trackers as trackers_lib
from hift_cli.cli import main
from hift_cli.trackers import Trackers

TINY = ["recipe=tiny", "data.max_eval_samples=4", "trainer.log_every=1000",
        "trainer.save_model=false"]


@pytest.fixture(autouse=True)
def _offline_trackers(tmp_path, monkeypatch):
    """No network, nothing outside tmp_path, whatever the user's environment says."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after each test


def train(*args: str) -> Path:
    """One in-process ``hift train`` on the tiny recipe; returns its run dir."""
    before = set(Path("outputs/train").glob("*/"))
    assert main(["train", *TINY, *args]) == 0
    (run,) = set(Path("outputs/train").glob("*/")) - before
    return run



def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hift")
    assert experiment is not None, f"no experiment 'hift' in {uri}"
    return client, client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


@pytest.mark.integration
def test_tensorboard_gets_every_step_and_the_eval_rows():
    run = train("trainer.max_steps=6", "hift.k=3", "trainer.eval_every=3",
                "trainer.loggers=[tensorboard]")
    assert list(run.glob("events.out.tfevents.*")), "no event file in the run dir"
    scalars = tensorboard_scalars(run)
    rows = metrics(run)
    train_rows = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in train_rows])
    assert [s for s, _ in scalars["eval/loss"]] == [0, 3, 6]  # before, every 3, after
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3, 4, 5, 6]
    assert {"cycle", "group", "tokens_per_second"} <= set(scalars)


@pytest.mark.integration
def test_mlflow_file_store_in_the_run_dir_holds_metrics_and_config():
    run = train("trainer.max_steps=4", "hift.k=2", "trainer.loggers=[mlflow]")
    client, (found,) = mlflow_runs((run / "mlruns").resolve().as_uri())
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    history = client.get_metric_history(found.info.run_id, "train/loss")
    losses = [(r["step"], r["train/loss"]) for r in metrics(run, "train/loss")]
    assert [m.step for m in history] == [s for s, _ in losses]
    assert [m.value for m in history] == pytest.approx([v for _, v in losses])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "eval/loss")] == [0, 4]
    params = found.data.params
    assert params["hift.k"] == "2" and params["trainer.max_steps"] == "4"
    assert params["optimizer._target_"] == "torch.optim.AdamW"
    assert params["trainer.loggers"] == "['mlflow']"
    assert json.loads((run / "trackers.json").read_text()) == {"mlflow": found.info.run_id}


def wandb_records(path: Path):
    """The records of an offline ``run-<id>.wandb`` file (LevelDB log format, W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.integration
def test_wandb_offline_writes_its_run_folder_in_the_run_dir():
    import wandb

    run = train("trainer.max_steps=4", "hift.k=2", "trainer.loggers=[wandb]")
    assert wandb.run is None  # finished at the end of the job
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    (folder,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    log_file = folder / f"run-{run_id}.wandb"
    assert log_file.stat().st_size > 0
    history, config, exit_code = {}, {}, None
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            assert record.run.display_name == run.name and record.run.project == "hift"
        elif kind == "exit":
            exit_code = record.exit.exit_code
    losses = {r["step"]: r["train/loss"] for r in metrics(run, "train/loss")}
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} \
        == pytest.approx(losses)
    assert "eval/loss" in history[0] and "eval/loss" in history[4]
    assert config["hift.k"] == 2 and config["trainer.loggers"] == ["wandb"]
    assert exit_code == 0


def test_a_tracker_that_is_not_installed_is_one_line_before_any_model_loads(
        capsys, monkeypatch):
    import hift_cli.build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    loaded = []
    monkeypatch.setattr(hift_cli.build, "load_model", lambda *a, **k: loaded.append(a))
    assert main(["train", *TINY, "trainer.loggers=[tensorboard,mlflow]"]) == 2
    assert capsys.readouterr().err == ("hift train: error: trainer.loggers: mlflow is not"
                                       " installed: pip install 'hift-cli[mlflow]'\n")
    assert not loaded and not list(Path("outputs/train").glob("*/"))


def test_an_unknown_logger_is_refused_with_the_valid_names(capsys):
    assert main(["train", *TINY, "trainer.loggers=[tensorbord]"]) == 2
    assert capsys.readouterr().err == (
        "hift train: error: trainer.loggers must be one of jsonl, tensorboard, wandb, mlflow"
        " (got 'tensorbord')\n")


@pytest.mark.integration
def test_jsonl_is_always_on_and_naming_it_is_a_no_op(tmp_path):
    assert compose_config().trainer.loggers == []
    assert compose_config("trainer.loggers=[jsonl]").trainer.loggers == ["jsonl"]
    with Trackers(["jsonl"], tmp_path / "run", {"a": 1}) as trackers:
        trackers.log({"step": 1, "train/loss": 1.0})
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_sweep_gives_one_tracker_run_per_job(tmp_path, monkeypatch):
    store = (tmp_path / "shared-mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # all jobs in one store
    assert main(["train", "-m", *TINY, "trainer.max_steps=2", "hift.k=2,3",
                 "trainer.loggers=[tensorboard,mlflow]"]) == 0
    jobs = sorted(p for p in Path("multirun/train").glob("*/*/") if p.is_dir())
    assert len(jobs) == 2
    client, runs = mlflow_runs(store)
    assert [r.data.params["hift.k"] for r in runs] == ["2", "3"]
    assert [r.info.run_name for r in runs] == [job.name for job in jobs]
    assert all(r.info.status == "FINISHED" for r in runs)
    for job, found in zip(jobs, runs):
        assert not (job / "mlruns").exists()  # MLFLOW_TRACKING_URI wins
        steps = [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")]
        assert steps == [1, 2]
        assert [s for s, _ in tensorboard_scalars(job)["train/loss"]] == [1, 2]


@pytest.mark.integration
def test_a_failed_run_closes_its_trackers_and_the_next_run_starts_new_ones(monkeypatch):
    import wandb

    from hift_cli import progress

    real_update = progress.TrainProgress.update

    def update(self, row, **kw):
        real_update(self, row, **kw)
        if row["step"] == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(progress.TrainProgress, "update", update)
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", *TINY, "trainer.max_steps=4", "trainer.loggers=[mlflow,wandb]"])
    assert wandb.run is None
    (failed,) = Path("outputs/train").glob("*/")
    client, (run,) = mlflow_runs((failed / "mlruns").resolve().as_uri())
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]

    monkeypatch.setattr(progress.TrainProgress, "update", real_update)
    # Its own run dir: Hydra names run dirs by the second, and the first run may end in it.
    second = train("trainer.max_steps=2", "trainer.loggers=[mlflow,wandb]",
                   "hydra.run.dir=outputs/train/second")
    assert second != failed
    ids = json.loads((second / "trackers.json").read_text())
    _, (run2,) = mlflow_runs((second / "mlruns").resolve().as_uri())
    assert run2.info.status == "FINISHED" and run2.info.run_id == ids["mlflow"]
    assert ids["wandb"] != json.loads((failed / "trackers.json").read_text())["wandb"]
    assert wandb.run is None


def test_a_tracker_that_cannot_start_is_one_line_and_closes_the_others(tmp_path, monkeypatch):
    import wandb

    from hift_cli.config import ConfigError

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\nmore")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError) as e:
        Trackers(["mlflow", "wandb"], tmp_path, {"a": 1})
    assert str(e.value) == ("trainer.loggers: wandb could not start a run: UsageError: No API"
                            " key configured. Use `wandb login` to log in.")
    _, (run,) = mlflow_runs((tmp_path / "mlruns").as_uri())
    assert run.info.status == "FAILED"  # the one opened before is not left running


def test_closing_marks_interrupted_runs_killed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Trackers(["mlflow"], tmp_path, {"a": 1}) as trackers:
            trackers.log({"step": 1, "train/loss": 2.0, "note": "text is skipped"})
            raise KeyboardInterrupt
    client, (run,) = mlflow_runs((tmp_path / "mlruns").as_uri())
    assert run.info.status == "KILLED" and run.data.params == {"a": "1"}
    assert set(run.data.metrics) == {"train/loss"}


@pytest.mark.integration
def test_a_resumed_run_continues_its_tracker_runs():
    run = train("trainer.max_steps=6", "hift.k=3", "trainer.save_every=2",
                "trainer.keep_last=5", "trainer.loggers=[tensorboard,mlflow,wandb]")
    first = json.loads((run / "trackers.json").read_text())
    # No final checkpoint (save_model=false): as if killed after step 6; resumes at 4.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]
    assert main(["train", *TINY, "trainer.max_steps=6", "hift.k=3", "trainer.save_every=2",
                 "trainer.keep_last=5", "trainer.loggers=[tensorboard,mlflow,wandb]",
                 f"resume={run}"]) == 0
    assert json.loads((run / "trackers.json").read_text()) == first
    losses = [(r["step"], r["train/loss"]) for r in metrics(run, "train/loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    # TensorBoard dropped the first attempt's steps 5 and 6; the resumed run's replace them.
    scalars = tensorboard_scalars(run)["train/loss"]
    assert [s for s, _ in scalars] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in losses])
    client, (found,) = mlflow_runs((run / "mlruns").resolve().as_uri())
    assert found.info.run_id == first["mlflow"] and found.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    # W&B: a second offline folder of the same run id (resume="allow"; wandb sync merges).
    # Both started within one second: wandb names the second "...-<id>-1".
    folders = [p.name for p in (run / "wandb").glob("offline-run-*")]
    assert len([f for f in folders if f"-{first['wandb']}" in f]) == 2, folders


def test_flatten_gives_dotted_keys():
    cfg = compose_config("hift.k=2")
    flat = trackers_lib.flatten(cfg)
    assert flat["hift.k"] == 2 and flat["trainer.loggers"] == []
    assert flat["optimizer._target_"] == "torch.optim.AdamW"
    assert not any(isinstance(v, dict) for v in flat.values())
