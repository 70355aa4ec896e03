"""train.report_to: TensorBoard, wandb (offline) and MLflow (local file store) each read back with
the library's own reader hold the metrics of metrics.jsonl at the same steps, the config, the
sample answers and (wandb, MLflow) the final adapter as an artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from loraforge.training import ConfigError, TrainConfig, train

from .util import QA_EVAL, tiny_config

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

# Every metric of metrics.jsonl's training and eval rows.
KEYS = ("loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "peak_host_bytes", "epoch",
        "eval_loss", "eval_ppl")
PROMPTS = ["What is 2+2?", "Name a colour."]


def offline_env(tmp: Path) -> dict:
    """wandb offline, its caches and staging under ``tmp``; no MLflow URI (the default store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp / "wandb-data"),
               WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_CONFIG_DIR=str(tmp / "wandb-config"))
    return env


def run_config(out: Path, trackers: list[str], **train_section) -> dict:
    section = {"report_to": trackers, "eval_every": 2, "sample_every": 2, "sample_prompts": PROMPTS,
               "sample_max_new_tokens": 4, **train_section}
    return tiny_config(out, data={"eval": QA_EVAL}, train=section)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """One 4-step run reporting to all three trackers."""
    tmp = tmp_path_factory.mktemp("tracked")
    with mock.patch.dict(os.environ, offline_env(tmp), clear=True):
        train(run_config(tmp / "out", ["tensorboard", "wandb", "mlflow"]))
    return tmp / "out"


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as ``key -> [(step, value)]`` for the metrics in KEYS."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    series = {k: [(r["step"], float(r[k])) for r in records if k in r and "event" not in r] for k in KEYS}
    assert all(series.values()), {k: len(v) for k, v in series.items()}
    return series


def close(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float) -> bool:
    return [s for s, _ in got] == [s for s, _ in want] and all(
        v == pytest.approx(w, rel=rel) for (_, v), (_, w) in zip(got, want)
    )


def test_tensorboard_event_files_hold_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key, want in expected(tracked).items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert close(got, want, rel=1e-6), (key, got, want)  # (TensorBoard stores float32)
    tags = acc.Tags()["tensors"]
    assert "samples/text_summary" in tags and "config/text_summary" in tags
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    samples = [json.loads(line) for line in (tracked / "samples.jsonl").read_text().splitlines()]
    assert sorted(texts) == sorted({r["step"] for r in samples}) == [0, 2, 4]
    assert all(r["prompt"] in texts[r["step"]] for r in samples)
    assert "summary/final_eval_loss" in acc.Tags()["scalars"]


def wandb_records(out: Path) -> list[dict]:
    """The offline run's .wandb log (``out``: the output directory or the file), read by wandb's own
    reader (``wandb leet inspect --json``)."""
    [log] = [out] if out.is_file() else (out / "wandb").glob("offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log)], capture_output=True,
                          text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_metrics_config_samples_and_adapter(tracked):
    records = wandb_records(tracked)
    history = [r["history"] for r in records if r["type"] == "history"]
    rows = {h["step"]["num"]: h["item"] for h in history}
    for key, want in expected(tracked).items():
        got = [(step, float(item[key])) for step, item in sorted(rows.items()) if key in item]
        assert close(got, want, rel=1e-12), (key, got, want)
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "loraforge"
    assert run["config"]["update"]["train.lr"] == 1e-2 and run["config"]["update"]["lora.r"] == 4
    ids = json.loads((tracked / "trackers.json").read_text())
    assert run["run_id"] == ids["wandb"]
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    tables = [a for a in artifacts if a["type"] == "run_table"]
    assert len(tables) == 3  # samples at steps 0, 2, 4
    [model] = [a for a in artifacts if a["type"] == "model"]
    assert model["name"] == f"adapter-{ids['wandb']}"
    files = {c["path"] for c in model["manifest"]["contents"]}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["final_eval_loss"] == pytest.approx(expected(tracked)["eval_loss"][-1][1])


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        return MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")


def test_mlflow_file_store_holds_metrics_params_samples_and_adapter(tracked):
    client = mlflow_client(tracked)
    run_id = json.loads((tracked / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "loraforge"
    for key, want in expected(tracked).items():
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert close(sorted(got), want, rel=1e-12), (key, got, want)
    assert run.data.params["train.lr"] == "0.01" and run.data.params["train.report_to"] == json.dumps(
        ["tensorboard", "wandb", "mlflow"]
    )
    adapter = {Path(f.path).name for f in client.list_artifacts(run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= adapter
    tables = sorted(Path(f.path).name for f in client.list_artifacts(run_id, "samples"))
    assert tables == ["step-000000.json", "step-000002.json", "step-000004.json"]
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step-000004.json")).read_text())
    answers = [r for r in map(json.loads, (tracked / "samples.jsonl").read_text().splitlines())
               if r["step"] == 4]
    assert table["columns"] == ["step", "prompt", "answer"]
    assert table["data"] == [[4, r["prompt"], r["answer"]] for r in answers]
    assert {Path(f.path).name for f in client.list_artifacts(run_id)} >= {"config.yaml", "adapter"}


def test_resume_continues_the_same_tracker_runs(tmp_path):
    """Stopped after 2 steps, resumed to 4: one MLflow run with every step; TensorBoard's reader
    gives each step once; wandb's second offline directory continues the same run id (``wandb sync``
    uploads both into one run); the ids in trackers.json unchanged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    with mock.patch.dict(os.environ, offline_env(tmp_path), clear=True):
        train(run_config(out, ["tensorboard", "mlflow", "wandb"], max_steps=2, save_every=1, sample_every=0))
        first = json.loads((out / "trackers.json").read_text())
        cfg = run_config(out, ["tensorboard", "mlflow", "wandb"], max_steps=4, save_every=1, sample_every=0)
        train({**cfg, "resume": "auto"})
    assert json.loads((out / "trackers.json").read_text()) == first
    client = mlflow_client(out)
    losses = client.get_metric_history(first["mlflow"], "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(first["mlflow"]).info.experiment_id])) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert close(got, expected(out)["loss"], rel=1e-6)
    runs = []
    for log in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(log)
        [run] = [r["run"]["run_id"] for r in records if r["type"] == "run"]
        runs.append((run, [r["history"]["step"]["num"] for r in records if r["type"] == "history"]))
    assert runs == [(first["wandb"], [0, 1, 2]), (first["wandb"], [3, 4])]


def test_missing_library_named_before_the_model_loads(tmp_path, monkeypatch):
    import loraforge.training.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loop, "prepare_model", no_model)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"train.report_to: wandb .*pip install 'loraforge\[track\]'"):
        train(run_config(tmp_path / "out", ["tensorboard", "wandb"]))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'comet'"):
        TrainConfig.load(run_config(tmp_path, ["tensorboard", "comet"]))
    with pytest.raises(ConfigError, match=r"train.report_to: a tracker is named twice"):
        TrainConfig.load(run_config(tmp_path, ["mlflow", "mlflow"]))


@pytest.mark.slow
def test_only_the_main_process_reports_under_torchrun(tmp_path):
    """2 DDP processes: one TensorBoard event file and one MLflow run holding each step once, one
    set of samples per sampling step, as a 1-process run writes them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .util import subprocess_env

    cfg = run_config(tmp_path / "two", ["tensorboard", "mlflow"])
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MLFLOW_")}
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "loraforge", "train", str(config), "train.batch_size=2",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    out = tmp_path / "two"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for key, want in expected(out).items():
        assert close([(e.step, e.value) for e in acc.Scalars(key)], want, rel=1e-6), key
    client = mlflow_client(out)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4) for p in PROMPTS]


def test_a_run_that_fails_ends_its_tracker_runs_as_failed(tmp_path, monkeypatch):
    import loraforge.training.outputs as outputs

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(outputs, "plot_losses", broken_plot)
    out = tmp_path / "out"
    with mock.patch.dict(os.environ, offline_env(tmp_path), clear=True):
        with pytest.raises(RuntimeError, match="plot failed"):
            train(run_config(out, ["mlflow"], sample_every=0))
    client = mlflow_client(out)
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert client.list_artifacts(run.info.run_id, "adapter") == []  # no final adapter uploaded
