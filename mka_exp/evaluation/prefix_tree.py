"""The prefix cache's plan: a radix tree of the requests' contexts (after lm-eval's left
truncation), in which every node is a run of tokens shared by every context below it; short shared
runs are pushed down into their children and continuations hang below as tails. Pure Python: no
model runs here (`prefix_cache` runs the tree).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

DEFAULT_CACHE_TOKENS = 16384  # KV tokens kept at once, and token slots of one forward
DEFAULT_MIN_SHARED = 16  # shorter shared runs are recomputed, not split off

Request = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass(eq=False)
class Node:
    """Tokens one row runs on top of its parent's path. A context node scores the first token
    of each request ending on it (`ends`); a tail (`tail=True`) is a continuation but its last
    token and scores the rest."""

    tokens: list[int]
    parent: Node | None = None
    ends: list[int] = field(default_factory=list)
    kids: list[Node] = field(default_factory=list)
    tail: bool = False
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # this node's own positions

    @property
    def offset(self) -> int:
        """Tokens on the path before this node."""
        node, total = self.parent, 0
        while node is not None:
            total += len(node.tokens)
            node = node.parent
        return total

    @property
    def end(self) -> int:
        return self.offset + len(self.tokens)

    def subtree(self) -> Iterator[Node]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.kids)

    def subtree_by(self, index: dict[int, dict[int, Node]]) -> Iterator[Node]:
        """`subtree` while the children still live in `build_tree`'s index."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(index.get(id(node), {}).values())


def build_tree(
    requests: list[Request], max_length: int, min_shared: int
) -> tuple[Node, dict[int, Node]]:
    """Radix tree of the truncated contexts (root: no tokens), short shared runs pushed down,
    tails attached; also each request's context node."""
    root = Node([])
    index: dict[int, dict[int, Node]] = {}  # id(node) -> its children by first token
    where: dict[int, Node] = {}
    for context, indices in group_by_prefix(requests, max_length).items():
        node = insert(root, list(context), index)
        node.ends.extend(indices)
        where.update(dict.fromkeys(indices, node))
    for node in list(root.subtree_by(index)):
        node.kids = list(index.get(id(node), {}).values())
    push_down_short(root, min_shared)
    for node in list(root.subtree()):
        tails: dict[tuple[int, ...], Node] = {}
        for i in node.ends:
            cont = requests[i][2]
            if len(cont) > 1:
                key = tuple(cont[:-1])
                if key not in tails:
                    tails[key] = Node(list(key), node, tail=True)
                    node.kids.append(tails[key])
                tails[key].ends.append(i)
    return root, where


def insert(root: Node, seq: list[int], index: dict[int, dict[int, Node]]) -> Node:
    """The node on which `seq` ends, splitting an edge where `seq` leaves it."""
    node, pos = root, 0
    while pos < len(seq):
        child = index.setdefault(id(node), {}).get(seq[pos])
        if child is None:
            index[id(node)][seq[pos]] = new = Node(seq[pos:], node)
            return new
        shared = common_length(child.tokens, seq, pos)
        if shared < len(child.tokens):  # split the edge: the shared run becomes a node
            mid = Node(child.tokens[:shared], node)
            index[id(node)][seq[pos]] = mid
            child.tokens, child.parent = child.tokens[shared:], mid
            index[id(mid)] = {child.tokens[0]: child}
            child = mid
        node, pos = child, pos + shared
    return node


def common_length(edge: list[int], seq: list[int], pos: int) -> int:
    n = min(len(edge), len(seq) - pos)
    for k in range(n):
        if edge[k] != seq[pos + k]:
            return k
    return n


def push_down_short(root: Node, min_shared: int) -> None:
    """Copy each shared run shorter than `min_shared` (no context ending on it) into its
    children, which then hang from its parent."""
    stack = [root]
    while stack:
        node = stack.pop()
        kids, node.kids = node.kids, []
        while kids:
            kid = kids.pop()
            if kid.kids and not kid.ends and len(kid.tokens) < min_shared:
                for grandkid in kid.kids:
                    grandkid.tokens = kid.tokens + grandkid.tokens
                    kids.append(grandkid)
                continue
            kid.parent = node
            node.kids.append(kid)
        stack.extend(node.kids)


def tree_tokens(root: Node) -> int:
    """Tokens the tree runs through the model (each node once, without padding)."""
    return sum(len(node.tokens) for node in root.subtree())


def requested_tokens(requests: list[Request], max_length: int) -> int:
    """Tokens lm-eval's HFLM runs for these requests, one sequence each."""
    return sum(min(len(c) + len(t), max_length + 1) - 1 for _, c, t in requests)


def group_by_prefix(requests: list[Request], max_length: int) -> dict[tuple[int, ...], list[int]]:
    """Request indices grouped by the tokens the model sees before the continuation, after
    lm-eval's left truncation of `context + continuation` to `max_length + 1` tokens."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"loglikelihood request {i}: context ({len(context)} tokens) and continuation "
                f"({len(continuation)}) must be non-empty, continuation <= {max_length} tokens"
            )
        whole = (context + continuation)[-(max_length + 1) :]
        groups[tuple(whole[: len(whole) - len(continuation)])].append(i)
    return groups
