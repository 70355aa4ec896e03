"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow.

Each receives, through their own client libraries:

- the config, flattened to ``section.key`` hyper-parameters (TensorBoard's HParams plugin, the
  wandb run config, MLflow params) and the whole YAML as text;
- every record of ``metrics.jsonl`` as it is written (``MetricsLog`` fans each write out here): its
  numeric fields as scalars at the record's step, so the trackers hold the same values at the same
  steps as the file; the ``end`` record's numbers go to the run summary (wandb) / as metrics at the
  last step (TensorBoard under ``summary/``, MLflow under ``summary.``);
- the sample generations (a text table per sampling step);
- the final adapter (or model) directory as an artifact: a wandb ``Artifact`` of type ``model``,
  MLflow ``log_artifacts`` under ``adapter/`` (or ``model/``). TensorBoard has no artifacts: the
  adapter stays in OUTPUT only.

Where they write: TensorBoard event files under ``OUTPUT/tensorboard``; wandb with its own
environment (``WANDB_PROJECT`` (default ``loraforge``), ``WANDB_MODE``, ``WANDB_DIR`` (default
``OUTPUT``, so the run directory is ``OUTPUT/wandb/...``)); MLflow at ``MLFLOW_TRACKING_URI``, default
``file:OUTPUT/mlruns`` (MLflow 3's file store, opted into with ``MLFLOW_ALLOW_FILE_STORE=true``, set
for that default), experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``loraforge``).

Resume: the wandb run id and the MLflow run id are kept in ``OUTPUT/trackers.json``; a resumed run
continues those runs (wandb ``resume="allow"``; the MLflow run is reopened). wandb ignores steps
lower than the ones it has seen, so the steps between the checkpoint and the interruption keep the
first attempt's values there; MLflow appends them again to each metric's history; TensorBoard
writes a new event file whose points for those steps follow the old ones (its reader keeps the
newest, discarding the out-of-order ones).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

from .config import ConfigError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""tracker name -> the module it needs."""
INSTALL = "pip install 'loraforge[track]'"


def check_trackers(names: list[str]) -> None:
    """Raise ConfigError naming the extra to install when a tracker's library is missing (called
    before the model loads); an unknown name is refused by ``TrainConfig.validate``."""
    for name in names:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError as e:
            raise ConfigError(
                f"train.report_to: {name} needs the {TRACKERS[name]} package ({e}); {INSTALL}"
            ) from None


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and None as their JSON text
    (hyper-parameter stores take scalars and strings only)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def numbers(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record (not its step, bools or nested values)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Trackers:
    """The trackers of one run (main process only). ``write(record)`` takes a metrics record,
    ``samples(step, rows)`` the answers of one sampling step, ``finish(result_dir)`` uploads the
    final adapter and closes the runs."""

    def __init__(self, names: list[str], config: dict, out: Path, resume: bool, yaml_text: str = ""):
        check_trackers(names)
        self.out = Path(out)
        ids_file = self.out / "trackers.json"
        ids = json.loads(ids_file.read_text()) if resume and ids_file.is_file() else {}
        self.sinks = [_OPEN[name](config, self.out, ids.get(name), yaml_text) for name in names]
        ids.update({s.name: s.run_id for s in self.sinks if s.run_id})
        self.out.mkdir(parents=True, exist_ok=True)
        ids_file.write_text(json.dumps(ids, indent=2))

    def write(self, record: dict) -> None:
        values = numbers(record)
        if not values:
            return
        end = record.get("event") == "end"
        for sink in self.sinks:
            sink.summary(record["step"], values) if end else sink.scalars(record["step"], values)

    def samples(self, step: int, rows: list[dict]) -> None:
        for sink in self.sinks:
            sink.samples(step, rows)

    def finish(self, result_dir: Path | None, failed: bool = False) -> None:
        """Upload ``result_dir`` (when given) and end the runs (marked failed when ``failed``);
        a second call does nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.finish(result_dir, failed)


def _markdown(rows: list[dict]) -> str:
    """A markdown table of (prompt, answer) rows; TensorBoard's text plugin renders it."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | answer |", "| --- | --- |"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['answer'])} |" for r in rows]
    return "\n".join(lines)


class _TensorBoard:
    name, run_id = "tensorboard", None

    def __init__(self, config: dict, out: Path, run_id, yaml_text: str):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        # The HParams plugin's records, in this run's own event file (add_hparams would open a
        # sub-run of its own).
        for summary in hparams(flatten(config), {}):
            self.writer.file_writer.add_summary(summary)
        if yaml_text:
            self.writer.add_text("config", f"```\n{yaml_text}\n```", 0)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"summary/{key}", value, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", _markdown(rows), step)

    def finish(self, result_dir, failed: bool) -> None:
        self.writer.close()  # (no artifacts in TensorBoard)


class _Wandb:
    name = "wandb"

    def __init__(self, config: dict, out: Path, run_id, yaml_text: str):
        import wandb

        self.wandb = wandb
        directory = Path(os.environ.get("WANDB_DIR") or out)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "loraforge",
            dir=str(directory),
            config=flatten(config),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def summary(self, step: int, values: dict) -> None:
        self.run.summary.update(values)

    def samples(self, step: int, rows: list[dict]) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "answer"])
        for r in rows:
            table.add_data(step, r["prompt"], r["answer"])
        self.run.log({"samples": table}, step=step)

    def finish(self, result_dir, failed: bool) -> None:
        if result_dir is not None and Path(result_dir).is_dir():
            kind = Path(result_dir).name  # adapter | model
            artifact = self.wandb.Artifact(f"{kind}-{self.run.id}", type="model")
            artifact.add_dir(str(result_dir))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=1 if failed else 0)


class _Mlflow:
    name = "mlflow"

    def __init__(self, config: dict, out: Path, run_id, yaml_text: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: MLflow 3 wants an opt-in for it (its sqlite store needs
            # sqlalchemy, which mlflow-skinny does not bring)
            uri = f"file:{(out / 'mlruns').resolve()}"
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "loraforge"
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=out.name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # (log_batch takes at most 100 params)
                self.client.log_batch(run_id, params=params[i : i + 100])
            if yaml_text:
                self.client.log_text(run_id, yaml_text, "config.yaml")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(prefix + k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def summary(self, step: int, values: dict) -> None:
        self.scalars(step, values, prefix="summary.")

    def samples(self, step: int, rows: list[dict]) -> None:
        # A table per sampling step (appending to one table would download it again each time)
        table = {"step": [step] * len(rows), "prompt": [r["prompt"] for r in rows]}
        table["answer"] = [r["answer"] for r in rows]
        self.client.log_table(self.run_id, table, artifact_file=f"samples/step-{step:06d}.json")

    def finish(self, result_dir, failed: bool) -> None:
        if result_dir is not None and Path(result_dir).is_dir():
            self.client.log_artifacts(self.run_id, str(result_dir), Path(result_dir).name)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_OPEN = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
