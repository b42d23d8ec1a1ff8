"""Server settings: one pydantic-settings class, from ``SIDECAR_*`` environment variables and flags.

This is the only module that reads the environment (and the key, certificate and private key files
it names).

Management (upload, delete, pin, unpin, rollback) needs an admin key whenever the server binds
an address other than loopback, unless ``allow_open_management`` says otherwise: TorchServe
turns model management off by default for the same reason.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.transform import MAX_CANVAS
from tuners.artifact import UPLOAD_LIMIT_BYTES

MiB, GiB = 1 << 20, 1 << 30
# what a browser sends as its Origin header: scheme://host[:port], the host a name or an address ([::1])
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?", re.IGNORECASE)


class Settings(BaseSettings):
    """Every knob of ``server-serve``. Each field is also a flag: ``--max-batch-size 16``."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", extra="forbid")

    backbone: str = Field("mobilenet_v2", description="registered backbone name")
    weights: str | None = Field(None, description="weights path (default: the offline package, then download)")
    allow_download: bool = Field(False, description="let torchvision download weights when nothing is local")
    image_size: int = Field(320, ge=32, le=MAX_CANVAS, description="longest image side on the backbone canvas")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="executor of the shared backbone pass (auto: onnx on the CPU, torch on CUDA)"
    )
    task_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="executor of side tasks' tuners and heads (auto: onnx compiled graphs on the CPU)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="autocast of the backbone and side heads on CUDA (the CPU runs fp32)"
    )
    cuda_graphs: bool = Field(True, description="replay captured CUDA graphs for the torch backbone on CUDA")
    stack_tasks: Literal["auto", "on", "off"] = Field(
        "auto", description="run side tasks of one architecture as one vmapped computation (auto: on CUDA)"
    )
    threads: int = Field(0, ge=0, le=1024, description="torch and ONNX Runtime CPU threads (0: their defaults)")
    store_dir: Path = Field(
        Path("store"), description="task artifacts, one folder per task and version (with store_url: its local mirror)"
    )
    store_url: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9+.-]*://",
        description="keep the tasks under an fsspec URL instead (s3://bucket/path, gs://..., file:///mnt/shared)",
    )
    keep_versions: int = Field(5, ge=1, description="versions kept per task; older ones are pruned at publish")
    quarantine_after_failures: int = Field(
        3, ge=1, description="consecutive inference failures after which a task's current version stops serving"
    )
    cache_dir: Path = Field(Path(".cache"), description="exported ONNX graphs (backbone and compiled tasks)")
    compiled_cache_bytes: int = Field(
        2 * GiB, gt=0, description="compiled task graphs kept in cache_dir; the least recently used go first"
    )
    device_cache_bytes: int = Field(256 * MiB, gt=0, description="byte budget of task models on the device")
    host_cache_bytes: int = Field(
        1024 * MiB,
        ge=0,
        description="byte budget of task models parked in host memory (on a CPU: added to the device's)",
    )
    cache_wait_s: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="how long a request waits for room in the device tier held by other requests' tasks",
    )
    feature_cache_bytes: int = Field(0, ge=0, description="byte budget of cached backbone taps (0: off)")
    # bounded: the runtime is warmed up at start with a batch of this size (8 x 1.2 MB at 320 px)
    max_batch_size: int = Field(8, ge=1, le=256, description="images per engine batch")
    batch_window_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits for more requests once several are queued (0: none)"
    )
    concurrent_batches: int = Field(
        0, ge=0, description="batches whose backbone pass may run at once (0: 2 with ONNX Runtime on the CPU, else 1)"
    )
    max_queue: int = Field(64, ge=1, description="queued requests before answering 503")
    max_request_bytes: int = Field(20 * MiB, gt=0, description="largest accepted request body")
    max_upload_bytes: int = Field(UPLOAD_LIMIT_BYTES, gt=0, description="largest accepted artifact upload")
    max_body_memory_bytes: int = Field(
        GiB,
        gt=0,
        description="bytes of request bodies (not uploads) received and not yet answered, all requests together; "
        "a body that would pass it is answered 503",
    )
    upload_concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="uploads read into memory and validated at once (each holds about twice its size); "
        "the others wait their turn, their bodies spooled to disk",
    )
    head_timeout_s: float = Field(
        20.0, gt=0, description="seconds a client has to send a request's line and headers before it is disconnected"
    )
    body_timeout_s: float = Field(
        20.0,
        gt=0,
        description="a request body must bring body_timeout_s * body_min_rate bytes every body_timeout_s (else 408)",
    )
    body_min_rate: float = Field(500.0, gt=0, description="bytes per second a request body must keep to")
    max_image_pixels: int = Field(
        40_000_000,
        gt=0,
        le=Image.MAX_IMAGE_PIXELS,  # above it Pillow refuses an image as a decompression bomb, whatever this says
        description=f"largest decoded image, in pixels (at most Pillow's {Image.MAX_IMAGE_PIXELS})",
    )
    max_tasks_per_request: int = Field(32, ge=1)
    admin_key: SecretStr | None = Field(
        None, description="management key(s), comma-separated; prefer admin_key_file (keys stay out of `ps`)"
    )
    admin_key_file: Path | None = Field(None, description="file with one admin key per line")
    inference_key: SecretStr | None = Field(None, description="detect key(s), comma-separated; admin keys work too")
    inference_key_file: Path | None = Field(None, description="file with one inference key per line")
    allow_open_management: bool = Field(
        False, description="let anyone who reaches a non-loopback address manage tasks without a key (unsafe)"
    )
    cors_origins: str = Field("", description="comma-separated origins allowed to call the API from a browser")
    host: str = Field("127.0.0.1")
    port: int = Field(8000, ge=0, le=65535)
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM); serve HTTPS with ssl_keyfile")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM)")
    task_latency_histograms: bool = Field(
        True,
        description="a latency histogram per task in /metrics (16 series for each task that has served requests); "
        "off: a count and a sum per task (3 series), for servers of thousands of tasks",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info")
    ray: bool = Field(False, description="serve on Ray Serve: engine replicas, requests routed to where tasks live")
    ray_address: str | None = Field(None, description="a Ray cluster to join (ray start --head); default: a local one")
    ray_replicas: int = Field(2, ge=1, description="engine replicas (the initial count when autoscaling)")
    ray_replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per engine replica")
    ray_replica_gpus: float = Field(0.0, ge=0, description="GPUs reserved per engine replica")
    ray_min_replicas: int = Field(0, ge=0, description="autoscaling lower bound (autoscaling is on when max > 0)")
    ray_max_replicas: int = Field(0, ge=0, description="autoscaling upper bound (0: a fixed number of replicas)")
    ray_max_tasks_per_replica: int = Field(256, ge=1, description="task ids a replica is indexed as holding")
    shutdown_timeout: float = Field(
        30.0, gt=0, description="on SIGTERM: seconds to let in-flight requests finish before exiting"
    )

    _admin_keys: tuple[SecretStr, ...] = PrivateAttr(())
    _inference_keys: tuple[SecretStr, ...] = PrivateAttr(())
    _proxied: bool = PrivateAttr(False)  # Serve's proxies, not ``host``, decide where the API listens

    @model_validator(mode="after")
    def _read_keys(self) -> Settings:
        self._admin_keys = _keys(self.admin_key, self.admin_key_file, "admin_key_file")
        self._inference_keys = _keys(self.inference_key, self.inference_key_file, "inference_key_file")
        if self.max_body_memory_bytes < self.max_request_bytes:
            raise ValueError(f"max_body_memory_bytes must be at least max_request_bytes, {self.max_request_bytes}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            _check_tls(self.ssl_certfile, self.ssl_keyfile)
        wrong = [o for o in self.cors_origin_list if o != "*" and not ORIGIN.fullmatch(o)]
        if wrong:  # a browser's Origin is scheme://host[:port]; anything else would never match, silently
            raise ValueError(f"cors_origins {wrong} are not origins: write scheme://host[:port], with no path or '/'")
        return self

    @property
    def admin_keys(self) -> tuple[SecretStr, ...]:
        """Every valid admin key (several at once, for rotation without downtime)."""
        return self._admin_keys

    @property
    def inference_keys(self) -> tuple[SecretStr, ...]:
        return self._inference_keys

    def behind_serve_proxies(self) -> Settings:
        """These settings where Serve's proxies decide the address the API listens on, whatever ``host``
        says (``serve run``, KubeRay): management without an admin key is then never taken to be
        loopback-only, so it is refused unless ``allow_open_management`` opens it."""
        proxied = self.model_copy()
        proxied._proxied = True
        return proxied

    @property
    def loopback_only(self) -> bool:
        """Whether the server binds a loopback address only (127.0.0.0/8, ::1, localhost)."""
        if self._proxied:
            return False
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything

    @property
    def management(self) -> Literal["key", "loopback", "open", "disabled"]:
        """How management calls are guarded: a key, loopback only, explicitly open, or refused."""
        if self.admin_keys:
            return "key"
        if self.loopback_only:
            return "loopback"
        return "open" if self.allow_open_management else "disabled"

    @property
    def management_message(self) -> str:
        """One line for the start-up log and ``/readyz``."""
        return {
            "key": "management needs an admin key",
            "loopback": "management is open on loopback only",
            "open": f"management is OPEN to anyone who reaches {self._address} (--allow-open-management); "
            "set an admin key",
            "disabled": f"management is disabled: {self._beyond} and no admin key is set "
            "(set SIDECAR_ADMIN_KEY_FILE or --admin-key-file)",
        }[self.management]

    @property
    def _address(self) -> str:
        return "the address Serve's proxies listen on" if self._proxied else self.host

    @property
    def _beyond(self) -> str:
        if self._proxied:
            return "Serve's proxies choose the address, maybe beyond loopback,"
        return f"{self.host} is beyond loopback"

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def _check_tls(certfile: Path, keyfile: Path) -> None:
    """Loads the certificate and key once, so that a missing file, a damaged PEM, a key that does
    not match the certificate or an encrypted key is one line before start-up: uvicorn would fail
    only after the backbone loaded, naming no file, and Serve's proxy would fail in its own actor."""
    for name, path in (("ssl_certfile", certfile), ("ssl_keyfile", keyfile)):
        if not path.is_file():
            raise ValueError(f"{name} {path} is not a file")
    try:  # the password callback runs only for an encrypted key, which has no flag here
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ValueError(
            f"ssl_certfile {certfile} with ssl_keyfile {keyfile} cannot be loaded "
            f"(a PEM certificate and its unencrypted private key): {e.strerror or e}"
        ) from None


def _keys(value: SecretStr | None, path: Path | None, name: str) -> tuple[SecretStr, ...]:
    """Keys from a comma-separated value and a file of one key per line; blank lines are skipped."""
    raw = value.get_secret_value().split(",") if value is not None else []
    if path is not None:
        try:
            raw += path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{name} {path} cannot be read: {e.strerror}") from None
    keys = tuple(SecretStr(k.strip()) for k in raw if k.strip())
    if path is not None and not keys:  # an empty secret mount would otherwise leave the server without a key
        raise ValueError(f"{name} {path} holds no key")
    return keys
