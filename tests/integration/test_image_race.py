"""Issue 10: an image rebuild racing a create. The rebuild is held (test hook) at the moment its
new image folder replaces the old one; a create started then must wait for the image's lock
instead of finding no image or linking a base the rebuild retires — and its VM boots."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import run_cli
from vmkit import Host


def test_a_create_racing_an_image_rebuild_still_boots(host: Host, home: Path,
                                                      image_home: Path) -> None:
    # the rebuild downloads nothing: the packages the session's image was built from
    (home / "cache").mkdir(exist_ok=True)
    (home / "cache/debs").symlink_to(image_home / "cache/debs")
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_PAUSE": "image:swapping:8"}
    rebuild = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "image", "build",
                                "tiny", "--force"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while (home / "images/tiny").exists() or not list(home.glob("images/.old-tiny-*")):
            assert rebuild.poll() is None, rebuild.communicate()
            assert time.monotonic() < deadline, "the rebuild never reached its swap"
            time.sleep(0.1)
        # the old image folder is set aside and the new one not yet in place: create now
        created = run_cli(home, "--lock-timeout", "120", "create", "racer", "--start", "--wait")
        assert created.returncode == 0, created.stderr
        assert rebuild.wait(timeout=300) == 0, rebuild.communicate()
    finally:
        if rebuild.poll() is None:
            rebuild.kill()
    vm = host.get("racer")
    assert vm.exec(["cat", "/proc/uptime"]).exit_code == 0
    run_cli(home, "stop", "racer", "--timeout", "10", check=True)
    run_cli(home, "start", "racer", "--wait", check=True)  # its base is still there
    assert vm.exec(["true"]).exit_code == 0
