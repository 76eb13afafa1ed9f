"""Write a cloud-init NoCloud seed: an ISO 9660 image with volume id `cidata`, made in Python."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.model.cloudinit import SEED_LABEL

if TYPE_CHECKING:
    import pycdlib


def _new_iso() -> pycdlib.PyCdlib:
    """pycdlib is imported here, by the commands that write or read a seed (~8 ms each CLI
    start would pay otherwise)."""
    import pycdlib

    return pycdlib.PyCdlib()


def _iso_name(name: str) -> str:
    """An ISO 9660 level-1 name; the Rock Ridge and Joliet names carry the real one."""
    stem = "".join(c for c in name.upper() if c.isalnum())[:8]
    return f"/{stem}.;1"


def write_seed(path: Path, files: dict[str, bytes]) -> None:
    """Write the seed atomically (a reader sees the old seed or the new one)."""
    iso = _new_iso()
    iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL,
            sys_ident="LINUX")
    for name, data in sorted(files.items()):
        iso.add_fp(io.BytesIO(data), len(data), _iso_name(name), rr_name=name,
                   joliet_path=f"/{name}")
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as out:
            iso.write_fp(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    finally:
        iso.close()
        partial.unlink(missing_ok=True)


def read_seed(path: Path) -> dict[str, bytes]:
    """The files of a seed by their Rock Ridge names (for checks and tests)."""
    iso = _new_iso()
    iso.open(str(path))
    try:
        found = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            found[name] = out.getvalue()
        label = iso.pvd.volume_identifier.decode().strip()
        found[".label"] = label.encode()
        return found
    finally:
        iso.close()
