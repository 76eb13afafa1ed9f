"""The snapshot tree of one VM (snapshots.json): pure data and tree edits, no I/O.

Invariants the engine keeps:
- a node's `layer` is the disk layer frozen when it was taken; that layer's backing file is the
  parent node's layer (or the VM's base when the node has no parent);
- the VM's active layer (vm.json `disk_file`) has the `current` node's layer as backing;
- deleting a node merges its layer into each child layer first, so every other node stays
  restorable; children move up to the deleted node's parent.
"""

from __future__ import annotations

import math
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmkit.errors import AlreadyExists, NotFound
from vmkit.model.names import validate_name
from vmkit.model.runtime import MachineRecord
from vmkit.model.spec import check_relative_path, invalid

NODES_LIMIT = 4096  # snapshots one VM may have (each is a layer in a backing chain)

TakenIn = Literal["running", "paused", "stopped"]


class SnapshotNode(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    parent: str | None
    created_at: float
    layer: str = Field(description="disk layer file name in disks/")
    memory: str | None = Field(default=None, description="memory state file in snapshots/")
    memory_size: int = 0
    taken_in: TakenIn
    quiesced: bool | None = None
    paused_ms: float | None = Field(default=None, description=(
        "how long a running guest was paused to take it (a live save pauses only its last "
        "pass)"))
    machine: MachineRecord | None = Field(default=None, description=(
        "the machine a memory snapshot was taken from (vm.json then + hot-plugged devices)"))
    nvram: str | None = Field(default=None, description=(
        "a UEFI VM's variables at that moment (snapshots/NAME.nvram.fd), brought back by a "
        "restore"))

    # names are DNS labels; layer and memory are files of the VM folder, in their own folders
    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, kind="snapshot name")

    @field_validator("parent")
    @classmethod
    def _parent(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, kind="snapshot parent name")

    @field_validator("layer")
    @classmethod
    def _layer(cls, value: str) -> str:
        return check_relative_path("snapshot layer", value, under="disks", suffix=".qcow2")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_relative_path("snapshot memory", value, under="snapshots", suffix=".state")

    @field_validator("nvram")
    @classmethod
    def _nvram(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_relative_path("snapshot nvram", value, under="snapshots", suffix=".fd")

    @field_validator("memory_size")
    @classmethod
    def _memory_size(cls, value: int) -> int:
        if not 0 <= value < 1 << 53:
            raise invalid("snapshot memory_size", value, "a byte count >= 0")
        return value

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise invalid("snapshot created_at", value, "a time in seconds since 1970")
        return value


class SnapshotTree(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    current: str | None = None
    nodes: dict[str, SnapshotNode] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """A tree: each node under its own name, parents and `current` among the nodes, no
        cycle (edits through model_copy keep this; a file from elsewhere is checked)."""
        if self.schema_version != 1:
            raise invalid("snapshots.json schema_version", self.schema_version, "1")
        if len(self.nodes) > NODES_LIMIT:
            raise invalid("snapshots.json nodes", len(self.nodes),
                          f"at most {NODES_LIMIT} snapshots")
        for key, node in self.nodes.items():
            if key != node.name:
                raise invalid("snapshot key", key, f"the node's own name {node.name!r}")
            if node.parent is not None and node.parent not in self.nodes:
                raise invalid(f"snapshot {key} parent", node.parent, "a snapshot of the tree")
        if self.current is not None and self.current not in self.nodes:
            raise invalid("snapshots.json current", self.current, "a snapshot of the tree")
        rooted: set[str] = set()  # nodes whose ancestry ends at a root
        for node in self.nodes.values():
            path: set[str] = set()
            walker: SnapshotNode | None = node
            while walker is not None and walker.name not in rooted:
                if walker.name in path:
                    raise invalid(f"snapshot {node.name} ancestry", sorted(path)[:8],
                                  "a tree (no snapshot is its own ancestor)")
                path.add(walker.name)
                walker = self.nodes[walker.parent] if walker.parent is not None else None
            rooted |= path
        return self

    def get(self, vm: str, name: str) -> SnapshotNode:
        validate_name(name, kind="snapshot name")
        if name not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise NotFound(f"VM {vm!r} has no snapshot {name!r} (snapshots: {known})",
                           hint=f"see vmkit snapshot list {vm}")
        return self.nodes[name]

    def check_new(self, vm: str, name: str) -> None:
        validate_name(name, kind="snapshot name")
        if name in self.nodes:
            raise AlreadyExists(f"VM {vm!r} already has a snapshot {name!r}",
                                hint="pick another name or delete that snapshot first")

    def children(self, name: str | None) -> list[SnapshotNode]:
        return sorted((n for n in self.nodes.values() if n.parent == name),
                      key=lambda n: n.created_at)

    def with_node(self, node: SnapshotNode) -> Self:
        """Add a node taken from the current position; it becomes current."""
        return self.model_copy(update={"nodes": {**self.nodes, node.name: node},
                                       "current": node.name})

    def without(self, name: str) -> Self:
        """Drop a node; its children hang from its parent, and so does `current` if it was it."""
        gone = self.nodes[name]
        nodes = {key: (node.model_copy(update={"parent": gone.parent})
                       if node.parent == name else node)
                 for key, node in self.nodes.items() if key != name}
        current = gone.parent if self.current == name else self.current
        return self.model_copy(update={"nodes": nodes, "current": current})

    def walk(self) -> list[tuple[int, SnapshotNode]]:
        """Depth-first (depth, node) pairs, oldest sibling first: the order a tree is drawn in."""
        out: list[tuple[int, SnapshotNode]] = []

        def visit(parent: str | None, depth: int) -> None:
            for child in self.children(parent):
                out.append((depth, child))
                visit(child.name, depth + 1)

        visit(None, 0)
        return out
