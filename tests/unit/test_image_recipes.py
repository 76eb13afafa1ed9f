"""The debian-12 recipe's pure parts: the suites it is built from, kernel order, and the
foreign-disk checks of qemu-img's answer (no image is built or opened here)."""

from __future__ import annotations

from vmkit.images import debian
from vmkit.qemu.img import foreign_problems


def test_the_image_is_built_from_the_update_and_security_suites_too() -> None:
    sources = {"bookworm": "http://m/debian", "bookworm-updates": "http://m/debian",
               "bookworm-security": "http://m/debian-security"}
    assert debian.apt_sources(sources) == (
        "deb http://m/debian bookworm main\n"
        "deb http://m/debian bookworm-updates main\n"
        "deb http://m/debian-security bookworm-security main\n")
    # a new security suite or mirror is a new recipe: the image is rebuilt
    base = debian.recipe(sources, {"systemd": "252"}, [])
    assert base != debian.recipe({"bookworm": "http://m/debian"}, {"systemd": "252"}, [])
    assert base != debian.recipe(sources, {"systemd": "252.1"}, [])
    assert base == debian.recipe(dict(sources), {"systemd": "252"}, [])


def test_the_newest_kernel_wins_by_version_not_by_spelling() -> None:
    names = ["vmlinuz-6.1.0-57-cloud-amd64", "vmlinuz-6.1.0-9-cloud-amd64",
             "vmlinuz-6.1.0-10-cloud-amd64"]
    assert max(names, key=debian._version_key) == "vmlinuz-6.1.0-57-cloud-amd64"
    assert sorted(names, key=debian._version_key)[0] == "vmlinuz-6.1.0-9-cloud-amd64"


def _facts(fmt: str, **extra: object) -> dict[str, object]:
    return {"format": fmt, "filename": "/dev/fd/5", "virtual-size": 1 << 30, **extra}


def test_foreign_disks_that_refer_to_other_files_are_refused() -> None:
    assert foreign_problems(_facts("qcow2")) == []
    assert foreign_problems(_facts("vmdk", **{"format-specific": {"type": "vmdk", "data": {
        "extents": [{"filename": "/dev/fd/5"}]}}})) == []
    cases = {
        "backing file": _facts("qcow2", **{"backing-filename": "/etc/shadow"}),
        "data in another file": _facts("qcow2", **{"format-specific": {
            "type": "qcow2", "data": {"data-file": "/dev/sda"}}}),
        "lies in other files": _facts("vmdk", **{"format-specific": {"type": "vmdk", "data": {
            "extents": [{"filename": "/dev/fd/5"}, {"filename": "/root/flat.vmdk"}]}}}),
        "format 'qed'": _facts("qed"),
        "virtual size is zero": {**_facts("raw"), "virtual-size": 0},
    }
    for needle, facts in cases.items():
        problems = foreign_problems(facts)
        assert problems and needle in "; ".join(problems), (needle, problems)
    # every problem is named at once, not only the first
    both = foreign_problems(_facts("qed", **{"backing-filename": "x"}))
    assert len(both) == 2
