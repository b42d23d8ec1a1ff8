"""``sidecar-client``: the client from a shell. Answers are JSON on stdout; an error is one line on
stderr with exit code 1 (the server refused, or could not be reached) or 2 (usage).

    sidecar-client detect --tasks digits,faces photo.jpg [--annotate out.jpg]
    sidecar-client tasks | task ID | upload ID ARTIFACT | delete ID | pin ID | unpin ID | versions ID | ready
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from clients import __version__
from clients.calls import SidecarError
from clients.client import SidecarClient
from clients.models import DetectResponse


def _seconds(text: str) -> float:
    """``--timeout``: seconds above 0 (under a year), as ``argparse`` type."""
    value = float(text)
    if not 0 < value < 3.2e7:  # also refuses NaN, which no comparison holds for
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _server(text: str) -> str:
    """``--url``: ``http(s)://host[:port]``, checked before any request (also when it comes from ``SIDECAR_URL``)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} is not a server's URL: write http(s)://host[:port]")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar-client", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--url", type=_server, default=os.environ.get("SIDECAR_URL", "http://localhost:8000"),
                   help="the server (env SIDECAR_URL)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("SIDECAR_API_KEY"), help="env SIDECAR_API_KEY")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per request")
    sub = p.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="detections of one or more tasks on each image")
    detect.add_argument("images", nargs="+", type=Path)
    detect.add_argument("--tasks", required=True, help="comma-separated task ids; id@N names a version")
    detect.add_argument("--score-threshold", type=float)
    detect.add_argument("--max-detections", type=int)
    detect.add_argument("--annotate", type=Path, help="write the image with its boxes here (a folder for several)")
    sub.add_parser("tasks", help="every task")
    sub.add_parser("ready", help="exit 0 when the server is ready, 1 otherwise")
    for name in ("task", "delete", "pin", "unpin", "versions"):
        sub.add_parser(name, help=f"{name} one task").add_argument("task_id")
    upload = sub.add_parser("upload", help="publish an artifact folder as a new version")
    upload.add_argument("task_id")
    upload.add_argument("artifact", type=Path)
    return p


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, indent=2)


def annotate(image: Path, result: DetectResponse, out: Path) -> None:
    """Draws every task's boxes (a fixed colour per task) with label and score; needs Pillow."""
    try:
        from PIL import Image, ImageDraw, ImageOps
    except ImportError:
        raise SystemExit("sidecar-client: --annotate needs Pillow: pip install 'sidecar-client[images]'") from None
    picture = ImageOps.exif_transpose(Image.open(image)).convert("RGB")  # the server's boxes are upright
    draw = ImageDraw.Draw(picture)
    for task in result.results:
        colour = "#" + hashlib.sha256(task.task.encode()).hexdigest()[:6]
        for d in task.detections:
            draw.rectangle(d.box, outline=colour, width=max(2, picture.width // 300))
            draw.text((d.box[0] + 3, d.box[1] + 2), f"{task.task}: {d.label} {d.score:.2f}", fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)


def run(args: argparse.Namespace, client: SidecarClient) -> int:
    if args.command == "ready":
        ready = client.ready()
        _out(json.dumps({"ready": ready}))
        return 0 if ready else 1
    if args.command == "detect":
        answers = {}
        for image in args.images:
            result = client.detect(image, args.tasks, args.score_threshold, args.max_detections)
            answers[str(image)] = result.model_dump(mode="json")
            if args.annotate:
                out = args.annotate / image.name if len(args.images) > 1 else args.annotate
                annotate(image, result, out)
        _out(json.dumps(answers[str(args.images[0])] if len(args.images) == 1 else answers, indent=2))
        return 0
    action = {
        "tasks": lambda: client.list_tasks(),
        "task": lambda: client.get_task(args.task_id),
        "delete": lambda: client.delete_task(args.task_id),
        "pin": lambda: client.pin(args.task_id),
        "unpin": lambda: client.pin(args.task_id, pinned=False),
        "versions": lambda: client.versions(args.task_id),
        "upload": lambda: client.upload_task(args.task_id, args.artifact),
    }[args.command]
    answer = action()
    _out(_json(answer if answer is not None else {"deleted": args.task_id}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with SidecarClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            return run(args, client)
    except SidecarError as e:
        sys.stderr.write(f"sidecar-client: {e}" + "\n")
    except httpx.HTTPError as e:
        sys.stderr.write(f"sidecar-client: cannot reach {args.url}: {e}" + "\n")
    except (OSError, ValueError, TypeError) as e:
        sys.stderr.write(f"sidecar-client: {e}" + "\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
