"""KSM as a host policy, against a sysfs stand-in: what is read, what is written, and the
errors a host without KSM or with a read-only sysfs gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmkit.core import ksm
from vmkit.errors import HostError


def _sysfs(root: Path, **values: int) -> Path:
    root.mkdir()
    defaults = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_shared": 0,
                "pages_sharing": 0, "full_scans": 0}
    for name, value in {**defaults, **values}.items():
        (root / name).write_text(f"{value}\n")
    return root


def test_switching_on_starts_merging_at_a_useful_scan_rate(tmp_path: Path) -> None:
    root = _sysfs(tmp_path / "ksm", pages_sharing=2560)
    state = ksm.switch(True, root)
    assert state.running and (root / "run").read_text() == "1\n"
    assert state.pages_to_scan == ksm.PAGES_TO_SCAN
    assert state.saved_bytes == 2560 * os.sysconf("SC_PAGE_SIZE")
    off = ksm.switch(False, root)
    assert not off.running and off.pages_to_scan == ksm.PAGES_TO_SCAN  # merged pages stay


def test_a_kernel_without_ksm_is_reported_not_crashed(tmp_path: Path) -> None:
    assert ksm.read(tmp_path / "none").available is False
    with pytest.raises(HostError, match="no KSM"):
        ksm.switch(True, tmp_path / "none")


def test_a_sysfs_that_refuses_the_write_names_the_file(tmp_path: Path) -> None:
    root = _sysfs(tmp_path / "ksm")
    (root / "run").unlink()
    (root / "run").mkdir()  # a write fails even for root (as on a read-only sysfs)
    with pytest.raises(HostError, match="run"):
        ksm.switch(True, root)
