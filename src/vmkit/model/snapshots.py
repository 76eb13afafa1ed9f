"""The snapshot tree of one VM (snapshots.json): pure data and tree edits, no I/O.

Invariants the engine keeps:
- a node's `layer` is the disk layer frozen when it was taken; that layer's backing file is the
  parent node's layer (or the VM's base when the node has no parent);
- the VM's active layer (vm.json `disk_file`) has the `current` node's layer as backing;
- deleting a node merges its layer into each child layer first, so every other node stays
  restorable; children move up to the deleted node's parent.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from vmkit.errors import AlreadyExists, NotFound
from vmkit.model.names import validate_name

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


class SnapshotTree(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    current: str | None = None
    nodes: dict[str, SnapshotNode] = {}

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
