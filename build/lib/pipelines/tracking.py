"""Experiment tracking for train and tune through Ray's integrations: TensorBoard event files by
default, MLflow (`--tracking mlflow[:URI]`, a local file store by default) and Weights & Biases
(`--tracking wandb`; offline unless WANDB_MODE says otherwise).

Train logs from rank 0 inside the Ray Train worker (Ray's `setup_mlflow` / `setup_wandb`, a
tensorboardX writer); tune passes Ray Tune's logger callbacks (TBXLoggerCallback,
MLflowLoggerCallback, WandbLoggerCallback). Everything is checked in the driver before Ray starts.
No Ray import at module level.
"""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import asdict, dataclass

from msdm.config import ConfigError

from . import storage

BACKENDS = ("tensorboard", "mlflow", "wandb", "none")
# MLflow >= 3 refuses its file store unless asked: it is the local default the jobs promise
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"


@dataclass(frozen=True)
class Tracking:
    tensorboard: bool = True
    mlflow: str = ""  # tracking URI; "" = off
    wandb: bool = False
    experiment: str = "msdm"
    wandb_mode: str = "offline"  # WANDB_MODE of the driver, else offline (no account needed)
    wandb_dir: str = ""  # WANDB_DIR of the driver ("" = the worker's working directory)

    def to_dict(self) -> dict:
        return asdict(self)


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking", action="append", default=[], metavar="BACKEND",
                   help="tensorboard (default, event files beside the run), mlflow[:URI] (a "
                        "local file store ./mlruns by default), wandb (offline unless WANDB_MODE "
                        "is set), none; repeatable. Each logs loss, learning rate and validation "
                        "metrics (train) or SI-SDRi and NFE per trial (tune)")
    p.add_argument("--experiment", default="msdm", help="MLflow experiment / W&B project")


def parse(values, experiment: str = "msdm") -> Tracking:
    """--tracking values -> Tracking; an unknown backend is a ConfigError."""
    tb, mlflow, wandb = True, "", False
    for value in values:
        kind, _, uri = value.partition(":")
        kind = kind.strip().lower()
        if kind not in BACKENDS:
            raise ConfigError(f"--tracking {value}: unknown backend {kind!r}; one of "
                              f"{', '.join(BACKENDS)} (mlflow takes a URI: mlflow:URI)")
        if kind == "none":
            tb = False
        elif kind == "mlflow":
            mlflow = uri or "file:" + os.path.abspath("mlruns")
        elif kind == "wandb":
            wandb = True
    return Tracking(tb, mlflow, wandb, experiment, os.environ.get("WANDB_MODE", "offline"),
                    os.environ.get("WANDB_DIR", ""))


def check(t: Tracking) -> None:
    """Before Ray starts: the backends' packages import and an MLflow store can be written."""
    if t.mlflow:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--tracking mlflow needs MLflow: pip install mlflow-skinny "
                              "(or pip install 'msdm[tracking]')") from None
        if t.mlflow.startswith("file:") or "://" not in t.mlflow:
            os.environ.setdefault(FILE_STORE_ENV, "true")
            folder = t.mlflow.removeprefix("file://").removeprefix("file:")
            probe = os.path.join(folder, f".msdm-probe-{uuid.uuid4().hex[:8]}")
            try:
                os.makedirs(folder, exist_ok=True)
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as e:
                raise ConfigError(f"--tracking mlflow:{t.mlflow}: cannot write the MLflow "
                                  f"store ({e})") from None
        try:
            mlflow.MlflowClient(t.mlflow).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure of the store is the user's to fix
            raise ConfigError(f"--tracking mlflow:{t.mlflow}: the store does not answer "
                              f"({type(e).__name__}: {e})") from None
    if t.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--tracking wandb needs wandb: pip install wandb") from None
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network by default
        os.environ.setdefault("WANDB_SILENT", "true")


def env_vars() -> dict:
    """Variables the Ray workers need for the backends (forwarded with the job's env)."""
    keys = (FILE_STORE_ENV, "WANDB_MODE", "WANDB_SILENT", "WANDB_DIR", "WANDB_API_KEY",
            "MLFLOW_TRACKING_TOKEN")
    return {k: os.environ[k] for k in keys if k in os.environ}


class TrainLogger:
    """Rank 0 of a Ray Train run: metrics rows to TensorBoard, MLflow and W&B."""

    def __init__(self, t: dict, run_uri: str, name: str, params: dict, rank: int):
        self.t, self.rank, self.tb, self.mlflow, self.wandb = Tracking(**t), rank, None, None, None
        if rank != 0:
            return
        if self.t.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb_uri = storage.join(run_uri, "tensorboard")
            self.tb_local = self.tb_uri if not storage.is_remote(run_uri) else \
                os.path.join(os.environ.get("TMPDIR", "/tmp"), f"msdm-tb-{uuid.uuid4().hex[:8]}")
            self.tb = SummaryWriter(self.tb_local)
        if self.t.mlflow:
            from ray.air.integrations.mlflow import setup_mlflow  # [ray]

            if self.t.mlflow.startswith("file:") or "://" not in self.t.mlflow:
                os.environ.setdefault(FILE_STORE_ENV, "true")
            self.mlflow = setup_mlflow(params, tracking_uri=self.t.mlflow,
                                       experiment_name=self.t.experiment, run_name=name,
                                       create_experiment_if_not_exists=True,
                                       tags={"msdm.job": "train", "msdm.run": run_uri})
        if self.t.wandb:
            from ray.air.integrations.wandb import setup_wandb  # [ray]

            os.environ["WANDB_MODE"] = self.t.wandb_mode  # read by Ray's API-key lookup
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = setup_wandb(params, project=self.t.experiment, name=name,
                                     mode=self.t.wandb_mode, dir=self.t.wandb_dir or None)

    def log(self, row: dict) -> None:
        if self.rank != 0:
            return
        step = int(row["step"])
        metrics = {k: float(v) for k, v in row.items()
                   if k not in ("step", "elapsed_s") and v != "" and v is not None}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()
            self._sync_tb()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _sync_tb(self) -> None:
        if self.tb_local != self.tb_uri:  # S3 storage: the local event files go up as they grow
            fs, path = storage.get_fs(self.tb_uri)
            for name in os.listdir(self.tb_local):
                fs.put_file(os.path.join(self.tb_local, name), f"{path}/{name}")

    def finish(self, final_checkpoint: str) -> None:
        if self.rank != 0:
            return
        if self.tb is not None:
            self.tb.close()
            self._sync_tb()
        if self.mlflow is not None:
            self.mlflow.set_tag("final_checkpoint", final_checkpoint)
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.summary["final_checkpoint"] = final_checkpoint
            self.wandb.finish()


def tune_callbacks(t: Tracking) -> list:
    """Ray Tune logger callbacks for the sweep (TensorBoard per trial, MLflow, W&B)."""
    from ray.tune.logger import TBXLoggerCallback  # [ray]

    out = [TBXLoggerCallback()] if t.tensorboard else []
    if t.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback  # [ray]

        out.append(MLflowLoggerCallback(tracking_uri=t.mlflow, experiment_name=t.experiment,
                                        tags={"msdm.job": "tune"}, save_artifact=False))
    if t.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback  # [ray]

        out.append(WandbLoggerCallback(project=t.experiment, mode=t.wandb_mode,
                                       dir=t.wandb_dir or None))
    return out
