"""Parameter-efficient tuners, the artifact format and the trainer.

Importing this package registers every method (one import line per method package).
"""

from tuners import bitfit, conv_adapter, cst, e3va, full_finetune, linear_probe, lora, lst, side_tuning  # noqa: F401
from tuners.base import TUNERS, Tuner, TunerConfig, register_tuner
from tuners.task_model import TaskModel, build_task_model


def list_tuners() -> list[str]:
    return TUNERS.names()


__all__ = ["TUNERS", "TaskModel", "Tuner", "TunerConfig", "build_task_model", "list_tuners", "register_tuner"]
