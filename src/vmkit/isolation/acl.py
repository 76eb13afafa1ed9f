"""POSIX ACL entries for one uid on one file, written as the `system.posix_acl_access` xattr
(no setfacl needed). Used for linked clones: the clone's uid gets read access to exactly the
frozen layers of the VM its disk leans on (and the right to traverse the folders that hold
them), and loses it when the clone goes.

The xattr format (linux/posix_acl_xattr.h): a little-endian u32 version 2, then entries of
(u16 tag, u16 perm, u32 id), sorted by tag then id; named entries need a mask entry.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

_XATTR = "system.posix_acl_access"
_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
READ, WRITE, EXECUTE = 4, 2, 1

Entries = dict[tuple[int, int], int]  # (tag, id) -> perm


def parse(blob: bytes) -> Entries:
    (version,) = struct.unpack_from("<I", blob)
    if version != _VERSION or (len(blob) - 4) % 8:
        raise ValueError("not a POSIX ACL xattr")
    return {(tag, ident): perm
            for tag, perm, ident in struct.iter_unpack("<HHI", blob[4:])}


def render(entries: Entries) -> bytes:
    """The xattr bytes, with the mask recomputed from the group class (or dropped)."""
    entries = {k: v for k, v in entries.items() if k[0] != MASK}
    named = [v for (tag, _), v in entries.items() if tag in (USER, GROUP)]
    if named:
        group_class = [*named, entries[GROUP_OBJ, _UNDEFINED]]
        mask = 0
        for perm in group_class:
            mask |= perm
        entries[(MASK, _UNDEFINED)] = mask
    body = b"".join(struct.pack("<HHI", tag, perm, ident)
                    for (tag, ident), perm in sorted(entries.items()))
    return struct.pack("<I", _VERSION) + body


def from_mode(mode: int) -> Entries:
    return {(USER_OBJ, _UNDEFINED): (mode >> 6) & 7, (GROUP_OBJ, _UNDEFINED): (mode >> 3) & 7,
            (OTHER, _UNDEFINED): mode & 7}


def _current(fd: int) -> Entries:
    try:
        entries = parse(os.getxattr(fd, _XATTR))
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return from_mode(stat.S_IMODE(os.fstat(fd).st_mode))
    return entries


def _open(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def grant(path: str, uid: int, perm: int) -> None:
    """Give `uid` `perm` on `path` (never through a symlink)."""
    fd = _open(path)
    try:
        entries = _current(fd)
        entries[(USER, uid)] = perm
        os.setxattr(fd, _XATTR, render(entries))
    finally:
        os.close(fd)


def revoke(path: str, uid: int) -> None:
    """Take back whatever `uid` was given on `path` (idempotent; a missing file is fine)."""
    try:
        fd = _open(path)
    except FileNotFoundError:
        return
    try:
        entries = _current(fd)
        if entries.pop((USER, uid), None) is None:
            return
        os.setxattr(fd, _XATTR, render(entries))
    finally:
        os.close(fd)


def users(path: str) -> dict[int, int]:
    """uid -> perm of the named user entries on `path`."""
    fd = _open(path)
    try:
        return {ident: perm for (tag, ident), perm in _current(fd).items() if tag == USER}
    finally:
        os.close(fd)
