"""Scale-out on a real local Ray Serve: 2 engine replicas of the small test backbone behind the same
HTTP API, served over TLS by Serve's proxy. Routing by residency, one backbone pass per fan-out,
versions reaching every replica, a replica killed under load, deletes everywhere, per-replica
metrics, and no process left behind."""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from clients import Retry, SidecarClient
from models.postprocess import PostprocessConfig
from server.exceptions import Overloaded, UnknownTask
from tests.server.conftest import free_port, self_signed_certificate, settings
from tuners.errors import ArtifactError

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: make test installs the 'ray' extra")
pytestmark = pytest.mark.ray


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@dataclass
class Cluster:
    url: str
    engines: object  # DeploymentHandle of the engine replicas
    cert: str  # the proxy's self-signed certificate
    http: httpx.Client  # trusts it

    def client(self, **options: object) -> SidecarClient:
        return SidecarClient(self.url, verify=self.cert, **options)

    def snapshots(self) -> list[dict]:
        """Every live replica's snapshot (a replica just killed may still be listed, and fails)."""
        found = self.engines.broadcast("snapshot").results(timeout_s=10, return_exceptions=True)
        return sorted((s for s in found if isinstance(s, dict)), key=lambda s: s["pid"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray import serve

    from server.scale.ray_app import APP, OFFLINE_ENV, build_app, start_proxies

    os.environ.update(OFFLINE_ENV)
    temp = tempfile.mkdtemp(prefix="sdray-", dir="/tmp")  # short: Ray keeps unix sockets here
    work = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, namespace="sidecar-test")
    cert, key = self_signed_certificate(work)
    config = settings(  # the store a cluster uses: a URL every replica reads through its own mirror
        work / "mirror", store_url=f"file://{work / 'shared'}", cache_dir=work / "cache", ray_replicas=2,
        ray_replica_cpus=0.25, threads=1, port=free_port(), ssl_certfile=cert, ssl_keyfile=key,
    )  # fmt: skip
    start_proxies(config)  # as server-serve --ray starts them
    serve.run(build_app(config), name=APP, route_prefix="/")
    started = _children(os.getpid())
    url = f"https://127.0.0.1:{config.port}"
    try:
        with httpx.Client(base_url=url, verify=str(cert), timeout=60) as http:
            yield Cluster(url, serve.get_deployment_handle("Engine", APP), str(cert), http)
    finally:
        started |= _children(os.getpid())
        serve.shutdown()
        ray.shutdown()
        deadline = time.time() + 20
        while _alive(started) and time.time() < deadline:
            time.sleep(0.2)
        left = _alive(started)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray left processes behind: {sorted(left)}"


def _served_by(cluster: Cluster, request) -> tuple[dict, dict]:  # noqa: ANN001
    """(the response, the snapshot before it of the replica that served it)."""
    before = {s["pid"]: s for s in cluster.snapshots()}
    answer = request()
    after = {s["pid"]: s for s in cluster.snapshots()}
    moved = [pid for pid in after if pid in before and after[pid]["images_served"] > before[pid]["images_served"]]
    assert len(moved) == 1, moved
    return answer, before[moved[0]]


def test_tasks_route_to_the_replica_that_holds_them(cluster: Cluster, artifacts, photo_bytes):
    tasks = [f"t{i}" for i in range(6)]
    with cluster.client() as client:
        for i, task in enumerate(tasks):
            assert client.upload_task(task, artifacts[f"side{i}"]).version == 1
        for task in tasks:  # first touch: each task loads where it lands
            client.detect(photo_bytes, [task])
        hits = 0
        for task in tasks * 3:
            answer, replica = _served_by(cluster, lambda t=task: client.detect(photo_bytes, [t]))
            assert answer.results[0].task == task
            hits += task in replica["resident"]
        assert hits >= 0.9 * len(tasks) * 3, hits  # repeated requests go where the task already is
        holders = {t: sum(t in s["resident"] for s in cluster.snapshots()) for t in tasks}
        assert all(n <= 2 for n in holders.values()) and sum(n == 1 for n in holders.values()) >= 4, holders


def test_a_fan_out_makes_one_backbone_pass_on_one_replica(cluster: Cluster, photo_bytes):
    with cluster.client() as client:
        before = {s["pid"]: s["backbone_passes"] for s in cluster.snapshots()}
        answer = client.detect(photo_bytes, ["t3", "t0", "t2", "t1"])
        after = {s["pid"]: s["backbone_passes"] for s in cluster.snapshots()}
    assert answer.backbone_passes == 1 and [r.task for r in answer.results] == ["t3", "t0", "t2", "t1"]
    assert sorted(after[p] - before[p] for p in after) == [0, 1]  # one pass, on one replica


def test_a_new_version_is_what_every_replica_serves_once_the_upload_answers(cluster: Cluster, artifacts, photo_bytes):
    with cluster.client() as client:
        assert client.upload_task("t0", artifacts["side6"]).version == 2
        everywhere = cluster.engines.broadcast("detect", photo_bytes, ["t0"], PostprocessConfig()).results(
            timeout_s=30
        )
        assert len(everywhere) == 2 and {r.results[0].version for r in everywhere} == {2}
        assert client.detect(photo_bytes, ["t0"]).results[0].version == 2
        assert client.detect(photo_bytes, ["t0@1"]).results[0].version == 1


def test_a_killed_replica_costs_at_most_its_requests_in_flight(cluster: Cluster, photo_bytes):
    with cluster.client() as client:
        client.pin("t3")
    victim = cluster.snapshots()[0]["pid"]
    statuses: list[tuple[int, str | None]] = []

    def ask() -> None:
        for i in range(5):
            r = cluster.http.post("/v1/detect", params={"tasks": f"t{i}"}, content=photo_bytes,
                                  headers={"content-type": "image/png"})  # fmt: skip
            statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join()
    assert len(statuses) == 20
    assert all(code == 200 or (code == 503 and retry) for code, retry in statuses), statuses
    deadline = time.time() + 60
    while time.time() < deadline:  # Ray replaces the replica
        pids = [s["pid"] for s in cluster.snapshots()]
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the killed replica was not replaced within 60 s")
    deadline = time.time() + 15
    while not all(s["pinned"] == ["t3"] for s in cluster.snapshots()):  # the new one pins t3 unasked
        assert time.time() < deadline, cluster.snapshots()
        time.sleep(0.5)
    with cluster.client() as client:
        client.pin("t3", pinned=False)


def test_a_restarted_writer_keeps_pins_and_its_next_write_reaches_every_replica(
    cluster: Cluster, artifacts, photo_bytes
):
    from ray import serve

    from server.scale.ray_app import APP

    writer = serve.get_deployment_handle("Writer", APP)
    with cluster.client(retry=Retry(attempts=20, total_s=90, backoff_s=0.5)) as client:
        client.pin("t2")
        before = writer.health.remote().result(timeout_s=10)
        os.kill(before["pid"], signal.SIGKILL)
        assert client.upload_task("t1", artifacts["side7"]).version == 2  # 503s while it restarts, retried
        after = writer.health.remote().result(timeout_s=10)
        assert after["pid"] != before["pid"] and after["incarnation"] != before["incarnation"]
        everywhere = cluster.engines.broadcast("detect", photo_bytes, ["t1"], PostprocessConfig()).results(
            timeout_s=30
        )
        assert len(everywhere) == 2 and {r.results[0].version for r in everywhere} == {2}
        assert client.get_task("t2").pinned is True  # the pinned set, read back from the store
        assert all(s["pinned"] == ["t2"] for s in cluster.snapshots())


def test_a_deleted_task_is_unknown_on_every_replica(cluster: Cluster, photo_bytes):
    with cluster.client() as client:
        client.delete_task("t5")
        answers = cluster.engines.broadcast("detect", photo_bytes, ["t5"], PostprocessConfig()).results(
            timeout_s=30, return_exceptions=True
        )
        assert len(answers) == 2 and all(isinstance(a, UnknownTask) for a in answers), answers
        r = cluster.http.post("/v1/detect", params={"tasks": "t5"}, content=photo_bytes,
                              headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_task"


def test_the_http_api_is_the_single_process_one(cluster: Cluster):
    from server.main import create_app

    assert cluster.url.startswith("https://") and cluster.http.get("/readyz").json()["ready"] is True
    with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP on the same port gets no answer
        httpx.get(cluster.url.replace("https", "http") + "/healthz", timeout=10)
    served = cluster.http.get("/openapi.json").json()["paths"]
    assert served.keys() == create_app(settings(Path("unused"))).openapi()["paths"].keys()
    r = cluster.http.get("/v1/tasks/nope")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_task") and r.headers["x-request-id"]
    metrics = cluster.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    replicas = {line.split('replica="')[1].split('"')[0] for line in metrics.text.splitlines() if 'replica="' in line}
    assert len(replicas) == 2  # each replica's registry, labelled
    assert "sidecar_tuner_cache_resident_bytes{replica=" in metrics.text
    assert "\nsidecar_request_body_bytes 0.0" in metrics.text  # the ingress's, which reads the bodies
    assert "sidecar_request_body_bytes{" not in metrics.text
    with cluster.client() as client:
        assert client.backbone().name == "mobilenet_v2"
        assert {t.id: t.residency for t in client.list_tasks()}["t0"] == "device"


def test_proxies_already_running_with_other_options_are_an_error(cluster: Cluster, tmp_path: Path):
    """Serve kept the running proxies' options and only logged that it ignored the new ones."""
    from server.scale.ray_app import start_proxies

    port, cert = int(cluster.url.rsplit(":", 1)[1]), Path(cluster.cert)
    with pytest.raises(RuntimeError, match=r"options \(\{'ssl_certfile': '/.*cert.pem'.*asks for ssl_certfile=None"):
        start_proxies(settings(tmp_path, port=port))  # the same port, without TLS
    with pytest.raises(RuntimeError, match=rf"\{{'port': {port}\}}, where this server asks for port=1\)"):
        start_proxies(settings(tmp_path, port=1, ssl_certfile=cert, ssl_keyfile=cert.with_name("key.pem")))
    assert cluster.http.get("/healthz").status_code == 200  # the running proxies are left as they were


def test_serve_run_with_tls_settings_says_where_tls_goes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``serve run server.scale.ray_app:app`` and KubeRay start Serve's proxies with Serve's own options,
    so TLS settings in the environment would be ignored: plain HTTP where HTTPS was asked for."""
    from server.scale import ray_app

    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.setenv("SIDECAR_SSL_CERTFILE", str(cert))
    monkeypatch.setenv("SIDECAR_SSL_KEYFILE", str(key))
    with pytest.raises(ValueError, match="take TLS from http_options in Serve's config"):
        ray_app.app  # noqa: B018  (the attribute builds the application)


def test_serve_run_never_takes_management_to_be_loopback_only(monkeypatch: pytest.MonkeyPatch):
    """``serve run`` and KubeRay bind where Serve's config says, whatever SIDECAR_HOST says."""
    from server.scale import ray_app

    monkeypatch.setattr(ray_app, "build_app", lambda settings: settings)
    for name in ("SIDECAR_ADMIN_KEY", "SIDECAR_ADMIN_KEY_FILE", "SIDECAR_ALLOW_OPEN_MANAGEMENT", "SIDECAR_HOST"):
        monkeypatch.delenv(name, raising=False)
    built = ray_app.app
    assert built.host == "127.0.0.1" and built.management == "disabled"
    assert pickle.loads(pickle.dumps(built)).management == "disabled"  # as the replicas get it
    monkeypatch.setenv("SIDECAR_ALLOW_OPEN_MANAGEMENT", "true")
    assert ray_app.app.management == "open"
    monkeypatch.setenv("SIDECAR_ADMIN_KEY", "a-key-of-enough-length")
    assert ray_app.app.management == "key"


def test_domain_errors_pickle_as_themselves():
    for error in (UnknownTask("no task 'x'"), Overloaded("busy", retry_after=3), ArtifactError(["a", "b"])):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    assert pickle.loads(pickle.dumps(Overloaded("busy", retry_after=3))).retry_after == 3


def test_a_failed_deployment_ends_in_the_replicas_own_error(monkeypatch: pytest.MonkeyPatch):
    """``server-serve --ray`` reported only "Failed to update the deployments ['Engine', 'Writer']"."""
    from server.scale import ray_app

    message = (
        "The deployment failed to start 3 times in a row. ... Error:\nTraceback (most recent call last):\n"
        '  File "server/services.py", line 93, in open_store\n'
        "OSError: --store-url zzz://a cannot be opened: Protocol not known: zzz\n"
    )  # as Serve keeps it
    deployments = {"Api": SimpleNamespace(status="HEALTHY", message=""),
                   "Engine": SimpleNamespace(status="DEPLOY_FAILED", message=message)}  # fmt: skip
    status = SimpleNamespace(applications={"sidecar": SimpleNamespace(deployments=deployments)})
    monkeypatch.setattr(ray_app.serve, "status", lambda: status)
    assert (
        ray_app.replica_error("sidecar")
        == "Engine: OSError: --store-url zzz://a cannot be opened: Protocol not known: zzz"
    )
    assert ray_app.replica_error("another") == ""
