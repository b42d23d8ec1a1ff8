"""Parameter-efficient tuners, the artifact format and the trainer.

Importing this package registers every method (one import line per method package).
"""

from tuners import (  # noqa: F401  (registration)
    bitfit,
    conv_adapter,
    cst,
    dyn_adapter,
    e3va,
    full_finetune,
    hst,
    hst_full,
    linear_probe,
    lora,
    lst,
    side_tuning,
)
from tuners.base import TUNERS, Tuner, TunerConfig, register_tuner
from tuners.task_model import TaskModel, build_task_model


def list_tuners() -> list[str]:
    return TUNERS.names()


__all__ = ["TUNERS", "TaskModel", "Tuner", "TunerConfig", "build_task_model", "list_tuners", "register_tuner"]
