"""The benchmarks' scratch folder: gone after a run, kept after a failure (its server logs)."""

from __future__ import annotations

import pytest

from bench.common import scratch


def test_scratch_is_removed_after_a_run_and_kept_after_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with scratch("sidecar-test-") as work:
        (work / "store.log").write_text("ok")
    assert not work.exists()
    with pytest.raises(RuntimeError), scratch("sidecar-test-") as kept:
        (kept / "store.log").write_text("server-serve exited")
        raise RuntimeError("the server did not start")
    try:
        assert (kept / "store.log").read_text() == "server-serve exited"
        assert str(kept) in capsys.readouterr().err
    finally:
        (kept / "store.log").unlink()
        kept.rmdir()
