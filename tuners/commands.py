"""What every command line shares: ``--version``, ``--verbose``, and one top-level handler that turns
each expected error into one line naming the problem (and its fix), with exit code 2 for a usage
mistake or 1 for a failure at run time. A traceback only with ``--verbose``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from pydantic import ValidationError

from models.imaging import ImageDecodeError
from models.weights import WeightsError
from tuners.data.records import DatasetError
from tuners.errors import ArtifactError, IncompatibleBackboneError, TunerError


class UsageError(ValueError):
    """The command was asked for something it cannot do; the message says what to change."""


USAGE = (UsageError, TunerError, DatasetError, ValidationError)  # the invocation or its inputs are wrong: exit 2
RUNTIME = (WeightsError, ArtifactError, IncompatibleBackboneError, ImageDecodeError, OSError, RuntimeError)


def package_version() -> str:
    try:
        return version("sidecar")
    except PackageNotFoundError:
        return "unknown"


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def unit_float(text: str) -> float:
    """An argparse ``type``: a number in [0, 1] (a score)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--version`` and ``--verbose``."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--verbose", action="store_true", help="debug logging, and tracebacks on errors")


def one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    text = " ".join(str(error).split())
    return text or type(error).__name__


def run(prog: str, body: Callable[[], int], verbose: bool = False) -> int:
    """Runs a command's body; expected errors become ``prog: error: ...`` on stderr and an exit code."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return body()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except USAGE + RUNTIME as e:
        if verbose:
            raise
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return 2 if isinstance(e, USAGE) else 1
