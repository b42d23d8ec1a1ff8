"""``server-train``: train one task's tuner on your COCO, VOC or YOLO data.

Examples:
    server-train --method cst --backbone mobilenet_v2 --data data/digits --format coco --epochs 12 --out runs/digits
    server-train --config train.toml --set tuner.reduction=4 --set lr=0.001
    server-train --list-methods [--json]
    server-train ... --publish http://localhost:8000 --api-key $KEY --task-id digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic.fields import FieldInfo

from tuners import list_tuners
from tuners.base import TUNERS
from tuners.commands import add_common, run
from tuners.trainer.config import TrainConfig, apply_set, build_config, read_config_file

if TYPE_CHECKING:
    from clients import TaskInfo

log = logging.getLogger("server-train")
TABLES = ("tuner", "head")  # set through the config file or --set tuner.KEY=VALUE


def _add_field(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    flag = "--" + name.replace("_", "-")
    default = "" if field.is_required() else f" (default: {field.default})"
    help_text = (field.description or "") + default
    if field.annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
    elif name == "cache_features":
        parser.add_argument(
            flag,
            nargs="?",
            const="memory",
            choices=("none", "memory", "disk"),
            default=argparse.SUPPRESS,
            help=help_text + "; alone: memory",
        )
    elif typing.get_origin(field.annotation) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(field.annotation), default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="server-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", type=Path, help="TOML or YAML file with any of the keys below")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. tuner.rank=8")
    p.add_argument("--list-methods", action="store_true", help="list methods, their kind and default options")
    p.add_argument("--json", action="store_true", help="with --list-methods: print JSON")
    add_common(p)
    for name, field in TrainConfig.model_fields.items():
        if name not in TABLES:
            _add_field(p, name, field)
    return p


def describe_methods() -> list[dict[str, Any]]:
    """Each method's kind, paper line and default options (with their help strings)."""
    rows = []
    for name in list_tuners():
        cls = TUNERS.get(name)
        options = {
            f.name: {"default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls.config_cls)
        }
        about = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        rows.append({"method": name, "kind": cls.kind, "about": about, "options": options})
    return rows


def format_methods(rows: list[dict[str, Any]]) -> str:
    """A text table: method, kind and paper line, then each option's default and help."""
    lines = ["method        kind    about", ""]
    for row in rows:
        lines.append(f"{row['method']:<14}{row['kind']:<8}{row['about']}")
        for name, option in row["options"].items():
            lines.append(f"{'':22}{name + '=' + repr(option['default']):<28}{option['help']}")
        lines += [f"{'':22}(no options)"] if not row["options"] else []
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}  # not --config, --json, ...
    values.update(flags)
    return build_config(apply_set(values, args.set))


def publish(config: TrainConfig, artifact: Path) -> TaskInfo:
    """Uploads the best artifact to a running server under ``task_id`` (default: the run folder's name)."""
    from clients import SidecarClient

    task_id = config.task_id or config.out.name
    with SidecarClient(config.publish or "", api_key=config.api_key) as client:
        return client.upload_task(task_id, artifact)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run("server-train", lambda: _train(args), args.verbose)


def _publish_or_say_how(config: TrainConfig, artifact: Path) -> bool:
    """Publishes; on failure keeps the artifact and prints the command that retries the upload."""
    from clients import SidecarError

    task_id = config.task_id or config.out.name
    try:
        uploaded = publish(config, artifact)
    except (SidecarError, OSError, httpx.HTTPError) as e:
        key = " --api-key $SIDECAR_API_KEY" if config.api_key else ""
        sys.stderr.write(
            f"server-train: error: the publish to {config.publish} failed ({' '.join(str(e).split())}); the trained "
            f"artifact is kept in {artifact}. Retry with:\n  sidecar-client --url {config.publish}{key} "
            f"upload {task_id} {artifact}\n"
        )
        return False
    log.info("published %s version %s to %s", uploaded.id, uploaded.version, config.publish)
    return True


def _train(args: argparse.Namespace) -> int:
    if args.list_methods:
        rows = describe_methods()
        sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else format_methods(rows))
        return 0
    from tuners.trainer.loop import Trainer  # torch-heavy; not needed for --help or --list-methods

    config = config_from_args(args)
    report = Trainer(config).fit()
    if config.publish and not _publish_or_say_how(config, Path(report["artifact"])):
        return 1
    summary = {k: report[k] for k in ("method", "AP", "AP50", "trainable_params", "task_cost_fraction_of_backbone")}
    sys.stdout.write(json.dumps({**summary, "report": str(config.out / "report.json")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
