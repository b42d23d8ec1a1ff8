"""The web console in a real browser: Debian's chromium driven by Playwright (``make test`` installs
both where the machine allows). Detect with two tasks, a bad file, a late answer, resizing, a task
uploaded from the tasks view, and the filter among many tasks, each checked on the DOM."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients import SidecarClient
from server.main import create_app
from tests.server.conftest import LiveServer, settings
from tuners.artifact import MANIFEST, WEIGHTS

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: make test installs it")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
expect = sync_api.expect
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary, and make test could not install one")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, backbone, artifacts) -> Iterator[tuple[str, object]]:
    """A live server with tasks ``digits`` and ``faces``, and a browser page on its console."""
    app = create_app(settings(tmp_path_factory.mktemp("console") / "store"), backbone=backbone)
    with LiveServer(app) as live, sync_api.sync_playwright() as playwright:
        with SidecarClient(live.url) as client:
            client.upload_task("digits", artifacts["side1"])
            client.upload_task("faces", artifacts["side2"])
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield live.url, browser
        finally:
            browser.close()


@pytest.fixture
def page(console):  # noqa: ANN001, ANN201
    url, browser = console
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#task-picks input[value='faces']")
    yield page
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _photo(tmp_path: Path, photo_bytes: bytes) -> Path:
    (tmp_path / "photo.png").write_bytes(photo_bytes)
    return tmp_path / "photo.png"


def _boxes_of(page, task: str) -> int:  # noqa: ANN001
    return page.locator(f"#stage .box[data-task='{task}']").count()


def test_an_image_gets_boxes_of_both_tasks_in_fixed_colours(page, tmp_path: Path, photo_bytes):  # noqa: ANN001
    page.fill("#threshold", "0")
    page.locator("#threshold").blur()  # commits the value (a change event) before the next step
    page.set_input_files("#file", str(_photo(tmp_path, photo_bytes)))
    page.wait_for_selector("#stage .box[data-task='faces']")
    assert _boxes_of(page, "digits") > 0 and _boxes_of(page, "faces") > 0
    assert page.get_attribute("#stage", "aria-busy") == "false" and "backbone pass" in page.text_content("#status")
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert page.locator("meta[name='viewport']").count() == 1 and page.get_by_label("Image", exact=True).count() == 1
    colour = page.locator("#stage .box[data-task='faces']").first.evaluate("e => e.style.borderColor")
    page.uncheck("#task-picks input[value='digits']")  # untick the other task: the colour stays
    expect(page.locator("#stage .box[data-task='digits']")).to_have_count(0)
    assert page.locator("#stage .box[data-task='faces']").first.evaluate("e => e.style.borderColor") == colour

    def where() -> tuple[float, float, float]:  # a box's place as a fraction of the picture, and its width
        box, img = page.locator("#stage .box").first.bounding_box(), page.locator("#img").bounding_box()
        return (box["x"] - img["x"]) / img["width"], (box["y"] - img["y"]) / img["height"], img["width"]

    before = where()
    page.set_viewport_size({"width": 320, "height": 800})  # the picture shrinks; its boxes follow
    page.wait_for_timeout(100)
    after = where()
    assert after[2] < 0.7 * before[2] and after[:2] == pytest.approx(before[:2], abs=0.02)


def test_a_file_that_is_not_an_image_shows_an_error_and_no_old_boxes(page, tmp_path: Path, photo_bytes):  # noqa: ANN001
    page.fill("#threshold", "0")
    page.locator("#threshold").blur()  # commits the value (a change event) before the next step
    page.set_input_files("#file", str(_photo(tmp_path, photo_bytes)))
    page.wait_for_selector("#stage .box")
    (tmp_path / "notes.txt").write_text("not a picture")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#status.error")
    assert "not an image" in page.text_content("#status")
    assert page.locator("#stage .box").count() == 0 and page.is_hidden("#img")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # claims to be an image
    page.set_input_files("#file", str(tmp_path / "fake.png"))
    expect(page.locator("#status")).to_contain_text("cannot be read")
    assert page.locator("#stage .box").count() == 0


def test_a_late_answer_to_an_older_request_is_not_drawn(page, tmp_path: Path, photo_bytes):  # noqa: ANN001
    box = {"box": [0, 0, 50, 50], "label": "STALE", "class_id": 0, "score": 0.99}
    result = {"task": "digits", "version": 1, "method": "cst", "kind": "side", "detections": [box]}
    stale = {"image": {"width": 512, "height": 512}, "backbone_passes": 1, "timing_ms": {"total": 1.0}}
    stale["results"] = [result]
    seen: list[float] = []

    def answer(route) -> None:  # noqa: ANN001
        seen.append(time.monotonic())
        if len(seen) == 1:  # the first request answers last, after the second has been drawn
            time.sleep(1.5)
            route.fulfill(status=200, content_type="application/json", body=json.dumps(stale))
        else:
            route.continue_()

    page.route("**/v1/detect*", answer)
    page.fill("#threshold", "0")
    page.locator("#threshold").blur()  # commits the value (a change event) before the next step
    page.set_input_files("#file", str(_photo(tmp_path, photo_bytes)))
    page.wait_for_timeout(200)
    page.fill("#threshold", "0.1")
    page.locator("#threshold").blur()  # a change event: a newer request while the first is in flight
    page.wait_for_selector("#stage .box")
    page.wait_for_timeout(2000)  # the stale answer has arrived by now
    assert len(seen) == 2
    assert "STALE" not in page.text_content("#stage") and page.locator("#stage .box").count() > 0


def test_a_task_uploaded_from_the_tasks_view_is_listed_and_usable(page, artifacts, tmp_path: Path, photo_bytes):  # noqa: ANN001
    page.click("#tab-tasks")
    page.wait_for_selector("#task-table tbody tr[data-task='digits']")
    page.fill("#upload-id", "helmets")
    artifact = artifacts["side3"]
    page.set_input_files("#upload-files", [str(artifact / MANIFEST), str(artifact / WEIGHTS)])
    page.click("#upload button[type=submit]")
    row = page.wait_for_selector("#task-table tbody tr[data-task='helmets']")
    assert "v1" in row.text_content() and "lst" in row.text_content()
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#task-table tbody tr[data-task='helmets'] >> text=Pin")
    expect(page.locator("tr[data-task='helmets']")).to_contain_text("Unpin")
    page.click("#tab-server")
    page.wait_for_selector("#server-facts dd")
    assert "mobilenet_v2" in page.text_content("#server-facts") and "task results per pass" in page.text_content(
        "#server-facts"
    )
    page.click("#tab-detect")
    page.wait_for_selector("#task-picks input[value='helmets']")
    for task in ("digits", "faces"):
        page.uncheck(f"#task-picks input[value='{task}']")
    page.check("#task-picks input[value='helmets']")
    page.fill("#threshold", "0")
    page.locator("#threshold").blur()  # commits the value (a change event) before the next step
    page.set_input_files("#file", str(_photo(tmp_path, photo_bytes)))
    page.wait_for_selector("#stage .box[data-task='helmets']")
    page.click("#tab-tasks")
    page.click("#task-table tbody tr[data-task='helmets'] >> text=Delete")
    page.wait_for_selector("#task-table tbody tr[data-task='helmets']", state="detached")
    expect(page.locator("#status")).to_have_text("deleted helmets")


def test_many_tasks_start_unticked_and_a_filter_finds_them(console, backbone, artifacts, tmp_path: Path, photo_bytes):  # noqa: ANN001
    """A server with more tasks than a request may name (32) had every one ticked at first, so the
    first image got an error; now past 8 none is, and the filter finds a task among hundreds."""
    from server.store import TaskStore

    _, browser = console
    folder, root = artifacts["side1"], tmp_path / "store"
    weights, manifest = (folder / WEIGHTS).read_bytes(), (folder / MANIFEST).read_bytes()
    store = TaskStore(root)
    for i in range(40):
        store.publish(f"line{i:02d}", weights, manifest, lambda _: None)
    with LiveServer(create_app(settings(root), backbone=backbone)) as live:
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(live.url)
        page.wait_for_selector("#task-picks input[value='line39']")
        assert page.locator("#task-picks input:checked").count() == 0
        expect(page.locator("#task-count")).to_have_text("0 of 40 ticked")
        page.get_by_label("Filter").fill("ne07")
        expect(page.locator("#task-picks label:visible")).to_have_count(1)
        page.check("#task-picks input[value='line07']")
        expect(page.locator("#task-count")).to_have_text("1 of 40 ticked")
        page.get_by_label("Filter").fill("")
        expect(page.locator("#task-picks label:visible")).to_have_count(40)
        page.fill("#threshold", "0")
        page.locator("#threshold").blur()  # commits the value (a change event) before the next step
        page.set_input_files("#file", str(_photo(tmp_path, photo_bytes)))
        page.wait_for_selector("#stage .box[data-task='line07']")
        assert page.locator("#stage .box:not([data-task='line07'])").count() == 0
        page.close()
