"""The web dashboard end to end: Playwright driving Debian's chromium (headless) against a
daemon started here and real TCG guests. Screenshots go to $VMKIT_ARTIFACTS (default
/tmp/vmkit-artifacts)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import Daemon, cli, running_daemon
from vmkit.daemon.web import COOKIE

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("VMKIT_ARTIFACTS", "/tmp/vmkit-artifacts"))
STATE_TIMEOUT = 120_000  # ms: a TCG boot on a busy 2-core machine


@pytest.fixture(scope="module")
def daemon(image_home: Path) -> Iterator[Daemon]:
    with new_home(image_home) as home, running_daemon(home) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert CHROMIUM.exists(), "Debian's chromium is missing (make setup installs it)"
    with playwright_sync.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                          args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, daemon: Daemon) -> Iterator[Any]:
    context = browser.new_context(ignore_https_errors=True, base_url=daemon.url,
                                  viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


def _login(page: Any, daemon: Daemon) -> None:
    page.goto("/ui/")
    page.wait_for_url(re.compile(r"/ui/login"))
    page.fill("#token", daemon.token)
    page.click("#login")
    page.wait_for_url(re.compile(r"/ui/(#.*)?$"))


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _state_cell(page: Any, name: str) -> Any:
    return page.locator(f'#vm-list tr[data-vm="{name}"] td.state')


def _fill_create(page: Any, name: str, memory: str) -> None:
    page.goto("/ui/#/create")
    page.fill('#create-form [name="name"]', name)
    page.fill('#create-form [name="memory"]', memory)
    page.click("#create-submit")


# -- access ----------------------------------------------------------------------------------
def test_without_a_token_every_page_and_api_call_is_refused(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, verify=False, timeout=10) as anonymous:
        page = anonymous.get("/ui/")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        for path in ("/ui/static/index.html", "/ui/static/app.js",
                     "/ui/vendor/@xterm/xterm/package.json", "/1.0/vms", "/1.0/host/history",
                     "/ui/session"):
            answer = anonymous.get(path, follow_redirects=True)
            assert answer.status_code in (401, 200) and COOKIE not in answer.text
            assert answer.status_code == 401 or answer.url.path == "/ui/login", (path, answer)
        login = anonymous.get("/ui/login")
        assert login.status_code == 200 and "frame-ancestors 'none'" in \
            login.headers["content-security-policy"]
        refused = anonymous.post("/ui/session", json={"token": "vmk_not-a-token"})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
        forged = anonymous.get("/1.0/vms", headers={"cookie": f"{COOKIE}=made-up"})
        assert forged.status_code == 401
        # no credentials: a body of more than a few KiB is refused before it is read
        flood = anonymous.post("/ui/session", content=b'{"token": "' + b"x" * (1 << 20) + b'"}',
                               headers={"content-type": "application/json"})
        assert flood.status_code == 413, flood.text
        opened = anonymous.post("/ui/session", json={"token": daemon.token})
        assert opened.status_code == 200, opened.text
        cookie = opened.headers["set-cookie"]
        assert all(part in cookie for part in ("HttpOnly", "Secure", "SameSite=Strict"))
        session = opened.json()
        assert daemon.token not in opened.text and session["csrf"]
        # the session reads; it changes nothing without the CSRF header (a cross-site form)
        assert anonymous.get("/1.0/vms").status_code == 200
        no_csrf = anonymous.post("/1.0/networks", json={"name": "csrf", "subnet":
                                                         "198.18.90.0/24"})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["error"]
        bad_csrf = anonymous.delete("/ui/session", headers={"x-vmkit-csrf": "guess"})
        assert bad_csrf.status_code == 403
        websocket_url = daemon.url.replace("https://", "wss://") + "/1.0/events"
        cookie_header = f"{COOKIE}={anonymous.cookies[COOKIE]}"
        with pytest.raises(InvalidStatus):  # cross-site websocket hijacking
            ws_connect(websocket_url, ssl=_insecure(),
                       additional_headers={"cookie": cookie_header,
                                           "origin": "https://evil.example"}).close()
        with ws_connect(websocket_url, ssl=_insecure(), additional_headers={
                "cookie": cookie_header, "origin": daemon.url}):
            pass
        # another site's page is refused whatever it holds: a bearer token, say
        foreign = httpx.post(f"{daemon.url}/1.0/networks", verify=False, json={
            "name": "xsite", "subnet": "198.18.91.0/24"}, headers={
            "authorization": f"Bearer {daemon.token}", "origin": "https://evil.example"})
        assert foreign.status_code == 403, foreign.text
        logout = anonymous.delete("/ui/session", headers={"x-vmkit-csrf": session["csrf"]})
        assert logout.status_code == 200
        assert anonymous.get("/1.0/vms").status_code == 401


def _insecure() -> Any:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_a_revoked_token_logs_its_browser_out(daemon: Daemon) -> None:
    token = cli(daemon.home, "token", "create", "brief-web").stdout.strip()
    with httpx.Client(base_url=daemon.url, verify=False, timeout=10) as browser_like:
        assert browser_like.post("/ui/session", json={"token": token}).status_code == 200
        assert browser_like.get("/1.0/vms").status_code == 200
        assert cli(daemon.home, "token", "revoke", "brief-web").returncode == 0
        assert browser_like.get("/1.0/vms").status_code == 401


def test_the_page_never_holds_the_token(page: Any, daemon: Daemon) -> None:
    _login(page, daemon)
    page.wait_for_selector("nav")
    stored = page.evaluate("() => JSON.stringify([localStorage, sessionStorage, "
                           "document.cookie])")
    assert daemon.token not in page.content() and daemon.token not in stored


# -- forms -----------------------------------------------------------------------------------
def test_a_bad_value_in_the_form_shows_the_apis_message_at_the_field(page: Any,
                                                                     daemon: Daemon) -> None:
    expect = playwright_sync.expect
    _login(page, daemon)
    _fill_create(page, "fine", "0")
    expect(page.locator('.field-error[data-for="memory"]')).to_contain_text("memory")
    page.fill('#create-form [name="memory"]', "256M")
    page.fill('#create-form [name="name"]', "../x")
    page.click("#create-submit")
    expect(page.locator('.field-error[data-for="name"]')).to_contain_text("not a DNS label")
    expect(page.locator('.field-error[data-for="memory"]')).to_be_empty()
    assert daemon.local().vms() == []  # nothing half-created


# -- a VM's life from the page -------------------------------------------------------------
def test_create_console_snapshot_clone_graphs_crash_and_delete_from_the_page(
        page: Any, daemon: Daemon) -> None:
    expect = playwright_sync.expect
    _login(page, daemon)
    _fill_create(page, "webvm", "256M")
    page.goto("/ui/#/vms")
    expect(_state_cell(page, "webvm")).to_have_text("running", timeout=STATE_TIMEOUT)
    vm = daemon.local().get("webvm")
    vm.wait_ready(timeout=180)
    kernel = vm.exec(["uname", "-r"]).stdout.strip()
    assert kernel

    # the console: typing works and the kernel's version comes back
    page.click('#vm-list tr[data-vm="webvm"] a')
    expect(page.locator("#vm-state")).to_have_text("running")
    expect(page.locator("#console-status")).to_have_text("connected", timeout=30_000)
    page.click("#console")
    page.keyboard.type("uname -a")
    page.keyboard.press("Enter")
    expect(page.locator("#console .xterm-rows")).to_contain_text(kernel, timeout=30_000)
    _shot(page, "dashboard-vm-console")

    # resizing: the terminal fits its box and the guest's tty is told its size
    wide = _tty_size(vm, lambda size: size[1] > 80)
    page.set_viewport_size({"width": 800, "height": 900})
    narrow = _tty_size(vm, lambda size: size[1] < wide[1])
    assert narrow[1] < wide[1], (wide, narrow)
    page.set_viewport_size({"width": 1280, "height": 900})

    # the daemon restarts: the page stays logged in and its console comes back by itself
    daemon.stop()
    expect(page.locator("#console-status")).not_to_have_text("connected", timeout=10_000)
    daemon.start()
    expect(page.locator("#console-status")).to_have_text("connected", timeout=60_000)
    page.click("#console")
    page.keyboard.type("echo back-$((6*7))")
    page.keyboard.press("Enter")
    expect(page.locator("#console .xterm-rows")).to_contain_text("back-42", timeout=30_000)

    # a snapshot: taken, in the tree, restored
    vm.exec(["sh", "-c", "echo before > /root/mark"])
    page.fill("#snapshot-name", "first")
    page.click("#snapshot-take")
    expect(page.locator('#snapshot-tree li[data-snapshot="first"]')).to_be_visible(
        timeout=120_000)
    vm.exec(["sh", "-c", "echo after > /root/mark"])
    page.click('#snapshot-tree li[data-snapshot="first"] button[data-action="restore"]')
    page.click("#confirm-yes")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        mark = _try_exec(vm, ["cat", "/root/mark"])
        if mark == "before":
            break
        time.sleep(1)
    assert mark == "before", mark
    page.fill("#snapshot-name", "second")
    page.click("#snapshot-take")
    expect(page.locator('#snapshot-tree li[data-snapshot="second"]')).to_have_attribute(
        "data-parent", "first", timeout=120_000)
    _shot(page, "dashboard-snapshot-tree")

    # a linked clone
    page.fill("#clone-name", "webvm-copy")
    page.select_option("#clone-kind", "linked")
    page.click("#clone-go")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and "webvm-copy" not in \
            [v.name for v in daemon.local().vms()]:
        time.sleep(1)
    assert "webvm-copy" in [v.name for v in daemon.local().vms()]

    # graphs: a busy guest has a non-empty CPU series with real load in it
    vm.exec(["sh", "-c", "(while :; do :; done) >/dev/null 2>&1 & echo $! > /run/busy"])
    page.reload()
    graph = page.locator("svg#graph-cpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and int(graph.get_attribute("data-points") or 0) < 3:
        time.sleep(1)
    assert int(graph.get_attribute("data-points") or 0) >= 3
    busiest = 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and busiest < 50:
        history = httpx.get(f"{daemon.url}/1.0/vms/webvm/history", verify=False,
                            headers={"authorization": f"Bearer {daemon.token}"}).json()
        busiest = max(s["cpu_percent"] for s in history["metadata"]["samples"])
        time.sleep(1)
    assert busiest >= 50, history  # a spinning vCPU keeps its TCG thread near one core
    deadline = time.monotonic() + 10  # and the page drew it (it polls every 2 s)
    while time.monotonic() < deadline and float(graph.get_attribute("data-max") or 0) < 50:
        time.sleep(0.5)
    assert float(graph.get_attribute("data-max") or 0) >= 50

    # the host overview, with a busy guest in its graphs and the TCG isolation note
    page.goto("/ui/#/")
    expect(page.locator("#accel")).to_contain_text("TCG", timeout=30_000)
    expect(page.locator("#tcg-note")).to_contain_text("promises no isolation")
    expect(page.locator("#graph-host-cpu")).not_to_have_attribute("data-points", "0")
    page.wait_for_timeout(2500)  # one more sample drawn
    _shot(page, "dashboard-host-overview")
    page.goto("/ui/#/vm/webvm")
    expect(page.locator("#vm-state")).to_have_text("running")

    # QEMU killed from outside: the page says crashed within 2 s, without a reload
    pid = vm.status().pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    expect(page.locator("#vm-state")).to_have_text("crashed", timeout=2_000)

    # the clone: started, stopped and deleted from the page
    page.goto("/ui/#/vm/webvm-copy")
    expect(page.locator("#vm-state")).to_have_text("defined")
    page.click('#vm-actions button[data-action="start"]')
    expect(page.locator("#vm-state")).to_have_text("running", timeout=STATE_TIMEOUT)
    daemon.local().get("webvm-copy").wait_ready(timeout=180)
    page.click('#vm-actions button[data-action="stop"]')
    expect(page.locator("#vm-state")).to_have_text("stopped", timeout=STATE_TIMEOUT)
    for name in ("webvm-copy", "webvm"):
        page.goto(f"/ui/#/vm/{name}")
        expect(page.locator("#vm-name")).to_have_text(name)
        page.click('#vm-actions button[data-action="delete"]')
        page.click("#confirm-yes")
        page.wait_for_url(re.compile(r"#/vms$"), timeout=120_000)
    expect(page.locator("#vm-list tr[data-vm]")).to_have_count(0, timeout=60_000)
    assert daemon.local().vms() == []


def _tty_size(vm: Any, wanted: Any, timeout: float = 20) -> tuple[int, int]:
    """The guest serial tty's rows and columns once `wanted` holds (or the last seen)."""
    size = (0, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows, cols = _try_exec(vm, ["stty", "-F", "/dev/ttyS0", "size"]).split() or ["0", "0"]
        size = (int(rows), int(cols))
        if wanted(size):
            break
        time.sleep(0.5)
    return size


def _try_exec(vm: Any, argv: list[str]) -> str:
    try:
        return str(vm.exec(argv, timeout=10).stdout.strip())
    except Exception:  # the guest may still be coming back from the restore
        return ""


def test_two_viewers_pause_resume_export_and_import_from_the_page(
        browser: Any, page: Any, daemon: Daemon, tmp_path: Path) -> None:
    """Keyboard-only login; two consoles on one VM see the same output; pause and resume;
    the export downloads a bundle that the import form uploads as a new VM."""
    expect = playwright_sync.expect
    page.goto("/ui/login")
    page.keyboard.type(daemon.token)  # the token field has the focus
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ui/(#.*)?$"))
    vm = daemon.local().create("twin", start=True, wait=True)
    page.goto("/ui/#/vm/twin")
    expect(page.locator("#console-status")).to_have_text("connected", timeout=30_000)
    second = page.context.new_page()
    second.goto(f"{daemon.url}/ui/#/vm/twin")
    expect(second.locator("#console-status")).to_have_text("connected", timeout=30_000)
    second.click("#console")
    second.keyboard.type("echo seen-by-$((20+22))")
    second.keyboard.press("Enter")
    for viewer in (page, second):
        expect(viewer.locator("#console .xterm-rows")).to_contain_text("seen-by-42",
                                                                      timeout=30_000)
    second.close()

    page.click('#vm-actions button[data-action="pause"]')
    expect(page.locator("#vm-state")).to_have_text("paused", timeout=30_000)
    page.click('#vm-actions button[data-action="resume"]')
    expect(page.locator("#vm-state")).to_have_text("running", timeout=30_000)
    vm.exec(["sh", "-c", "echo carried > /root/mark"])
    page.click('#vm-actions button[data-action="stop"]')
    expect(page.locator("#vm-state")).to_have_text("stopped", timeout=STATE_TIMEOUT)
    # an extra disk from the page: a bad size is named, a good one is listed and exported
    page.fill("#disk-name", "data")
    page.fill("#disk-size", "-1G")
    page.click("#disk-add")
    expect(page.locator("#disk-error")).to_contain_text("disk size", timeout=30_000)
    page.fill("#disk-size", "32M")
    page.click("#disk-add")
    expect(page.locator('#disk-list tr[data-disk="data"]')).to_contain_text("32",
                                                                          timeout=60_000)

    with page.expect_download(timeout=180_000) as download_info:
        page.click("#export-go")
        page.locator("#export-link").click(timeout=180_000)
    bundle = tmp_path / "twin.vmkit"
    download_info.value.save_as(bundle)
    assert bundle.stat().st_size > 1 << 20

    page.goto("/ui/#/vms")
    page.set_input_files("#import-file", str(bundle))
    page.fill("#import-name", "twin-copy")
    page.click("#import-go")
    expect(page.locator("#vm-name")).to_have_text("twin-copy", timeout=180_000)  # its page
    copy = daemon.local().get("twin-copy")
    copy.start()
    copy.wait_ready(timeout=180)
    assert copy.exec(["cat", "/root/mark"]).stdout.strip() == "carried"
    assert [d.name for d in copy.disks()] == ["data"]
    for each in (copy, vm):
        each.delete(force=True)


def test_the_screen_of_a_vm_with_a_display_in_the_page(page: Any, daemon: Daemon,
                                                       image_home: Path,
                                                       tmp_path: Path) -> None:
    """A VM booted through its firmware (a disk made elsewhere) shows its screen in noVNC over
    the daemon's websocket; the screenshot button downloads a PNG of it."""
    from playwright.sync_api import expect

    from tests.integration.anyos_media import bootable_disk, png_is_blank

    disk = bootable_disk(image_home, tmp_path / "disk")
    local = daemon.local()
    vm = local.create("screenvm", from_disk=str(disk), firmware="bios", memory="512M")
    vm.start()
    _login(page, daemon)
    page.goto("/ui/#/vm/screenvm")
    expect(page.locator("#screen-section")).to_be_visible()
    expect(page.locator("#screen-status")).to_have_text("connected", timeout=STATE_TIMEOUT)
    canvas = page.locator("#screen canvas")
    expect(canvas).to_be_visible()
    # GRUB's text reaches the canvas: its pixels are not all one colour
    deadline = time.monotonic() + 60
    colours = 0
    while time.monotonic() < deadline and colours < 2:
        colours = page.evaluate("""() => {
            const c = document.querySelector('#screen canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length && seen.size < 4; i += 4 * 97) seen.add(d[i]);
            return seen.size; }""")
        time.sleep(1)
    assert colours >= 2
    expect(page.locator("#vm-facts")).to_contain_text("through BIOS (SeaBIOS)")
    _shot(page, "dashboard-screen")
    with page.expect_download(timeout=60_000) as download_info:
        page.click("#screenshot")
    saved = tmp_path / "screen.png"
    download_info.value.save_as(str(saved))
    assert not png_is_blank(saved.read_bytes())
    # the websocket is the API's: without credentials it is refused
    with pytest.raises(InvalidStatus):
        ws_connect(f"wss://{daemon.listen}/1.0/vms/screenvm/vnc",
                   ssl=_insecure()).close()
    vm.kill()
