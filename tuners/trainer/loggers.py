"""Where epoch metrics go besides ``results.csv``: nowhere else (``none``), TensorBoard or MLflow.
The integrations are optional extras (``pip install 'sidecar[tensorboard]'`` or ``'sidecar[mlflow]'``);
asking for one that is not installed is a usage error that says what to install."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tuners.errors import TunerError

LOGGERS = ("none", "tensorboard", "mlflow")


class MetricsLogger(Protocol):
    def log(self, epoch: int, stats: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(stats: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and k != "epoch"}


class NoLogger:
    def log(self, epoch: int, stats: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardLogger:
    """Scalars under ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``)."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, epoch: int, stats: dict[str, Any]) -> None:
        for key, value in _numbers(stats).items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run (tracking URI and experiment from MLflow's own environment variables)."""

    def __init__(self, out: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)

    def log(self, epoch: int, stats: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(stats), step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()


def build_logger(name: str, out: Path) -> MetricsLogger:
    if name == "none":
        return NoLogger()
    try:
        return TensorBoardLogger(out) if name == "tensorboard" else MlflowLogger(out)
    except ImportError:
        raise TunerError(f"--logger {name} needs the {name} package: pip install 'sidecar[{name}]'") from None
