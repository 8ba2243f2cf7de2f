"""`PrefixTrie`: the set of valid semantic-ID paths as dense CSR arrays for the decoder.

The layout is the contract of docs/design.md ("PrefixTrie"):

- nodes are numbered level by level: node 0 is the root, then the depth-1 nodes, then
  depth 2, ..., then the leaves (depth ``L``); within a depth, in lexicographic order of
  their code prefixes;
- ``child_start [num_nodes + 1] int32``: CSR offsets, the children of node ``n`` are the
  edges ``child_start[n] : child_start[n + 1]``;
- ``child_code [num_edges] int32``: the code of each edge, ascending within a node;
- ``child_node [num_edges] int32``: the node each edge leads to;
- ``leaf_item [num_nodes] int32``: the item index at a leaf, ``-1`` elsewhere.

Because nodes are numbered in the same order as the edges that lead to them, a freshly
built trie has ``child_node[e] == e + 1`` and ``num_edges == num_nodes - 1``; the decoder
does not rely on that (a padded trie, see `PrefixTrie.pad`, keeps it only for real nodes).

The arrays are pytree leaves (jax arrays) so a trie is an ordinary argument of a jitted
function: another candidate pool with the same array shapes and static fields reuses the
compiled search. The host-side helpers (`contains`, `lookup`, `paths`, `subset`) work in
NumPy and are meant for building, validating and testing, not for use under `jit`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class PrefixTrie:
  """Valid code paths of a catalogue (or of a candidate pool), as CSR arrays.

  Attributes:
    child_start: ``[num_nodes + 1] int32`` CSR offsets into the edge arrays.
    child_code: ``[num_edges] int32`` code of each edge, ascending within a node.
    child_node: ``[num_edges] int32`` node each edge leads to.
    leaf_item: ``[num_nodes] int32`` item index of a leaf, ``-1`` for inner nodes.
    num_levels: ``L``, the length of every path (static).
    max_children: per depth ``0..L-1``, the largest number of children of a node at
      that depth (static); the decoder gathers this many candidates per beam.
    vocab_sizes: per level, the size of the code vocabulary (static); every code at
      level ``l`` is in ``[0, vocab_sizes[l])``.
  """

  child_start: jax.Array
  child_code: jax.Array
  child_node: jax.Array
  leaf_item: jax.Array
  num_levels: int = struct.field(pytree_node=False)
  max_children: tuple[int, ...] = struct.field(pytree_node=False)
  vocab_sizes: tuple[int, ...] = struct.field(pytree_node=False)

  # ------------------------------------------------------------------ building

  @classmethod
  def from_codes(
      cls,
      codes: np.ndarray,
      items: np.ndarray,
      vocab_sizes: Optional[Sequence[int]] = None,
  ) -> "PrefixTrie":
    """Builds the trie of ``N`` items from their code paths (vectorised NumPy).

    Args:
      codes: ``[N, L]`` non-negative integer code paths, one row per item.
      items: ``[N]`` item indices (distinct, non-negative) stored at the leaves.
      vocab_sizes: per-level vocabulary sizes; default ``codes.max(0) + 1``.

    Returns:
      The trie, with int32 jax arrays.

    Raises:
      ValueError: on bad shapes, an empty catalogue, codes outside
        ``[0, vocab_sizes[l])``, repeated items, or two items sharing a full path.
    """
    codes = np.asarray(codes)
    items = np.asarray(items)
    if codes.ndim != 2:
      raise ValueError(f"codes must be [N, L], got shape {codes.shape}")
    n, num_levels = codes.shape
    if items.shape != (n,):
      raise ValueError(f"items must be [N]={n}, got shape {items.shape}")
    if n == 0 or num_levels == 0:
      raise ValueError(f"a trie needs at least one item and one level, got codes {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer) or not np.issubdtype(items.dtype, np.integer):
      raise ValueError(f"codes and items must be integers, got {codes.dtype} and {items.dtype}")
    if vocab_sizes is None:
      vocab_sizes = tuple(int(v) + 1 for v in codes.max(axis=0))
    vocab_sizes = tuple(int(v) for v in vocab_sizes)
    if len(vocab_sizes) != num_levels:
      raise ValueError(f"vocab_sizes has {len(vocab_sizes)} levels, codes have {num_levels}")
    lo, hi = codes.min(axis=0), codes.max(axis=0)
    for lvl in range(num_levels):
      if lo[lvl] < 0 or hi[lvl] >= vocab_sizes[lvl]:
        bad = np.flatnonzero((codes[:, lvl] < 0) | (codes[:, lvl] >= vocab_sizes[lvl]))[0]
        raise ValueError(
            f"code out of range at level {lvl}: item {int(items[bad])} has code "
            f"{int(codes[bad, lvl])}, vocabulary size is {vocab_sizes[lvl]}")
    if items.min() < 0 or items.max() >= np.iinfo(np.int32).max:
      raise ValueError("items must be non-negative int32 indices")
    if max(vocab_sizes) > np.iinfo(np.int32).max:
      raise ValueError("codes must fit in int32")

    sorted_items = np.sort(items)
    dup = np.flatnonzero(sorted_items[1:] == sorted_items[:-1])
    if dup.size:
      raise ValueError(f"item {int(sorted_items[dup[0]])} appears more than once")

    # Lexicographic order of the paths (lexsort's last key is the primary one).
    order = np.lexsort(codes.T[::-1])
    codes = codes[order].astype(np.int32, copy=False)
    items = items[order].astype(np.int32, copy=False)

    # new[d][i]: row i starts a new prefix of length d+1.
    new = np.ones(n, dtype=bool)
    node_of_row_prev = np.zeros(n, dtype=np.int64)  # the root for every row
    num_nodes_before = 1  # root
    parents, edge_codes, depth_counts = [], [], []
    node_of_row = node_of_row_prev
    for d in range(num_levels):
      changed = np.empty(n, dtype=bool)
      changed[0] = True
      changed[1:] = codes[1:, d] != codes[:-1, d]
      new = new | changed if d else changed
      if d == num_levels - 1 and not new.all():
        i = int(np.flatnonzero(~new)[0])
        raise ValueError(
            f"items {int(items[i - 1])} and {int(items[i])} share the full path "
            f"{codes[i].tolist()}; add a level that separates them")
      firsts = np.flatnonzero(new)
      node_of_row = num_nodes_before + np.cumsum(new) - 1
      parents.append(node_of_row_prev[firsts])
      edge_codes.append(codes[firsts, d])
      depth_counts.append(firsts.size)
      num_nodes_before += firsts.size
      node_of_row_prev = node_of_row
    num_nodes = num_nodes_before
    num_edges = num_nodes - 1

    parent = np.concatenate(parents)  # parent of node e+1 == source of edge e
    child_code = np.concatenate(edge_codes).astype(np.int32)
    child_count = np.bincount(parent, minlength=num_nodes)
    child_start = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(child_count, out=child_start[1:])
    child_node = np.arange(1, num_nodes, dtype=np.int32)
    leaf_item = np.full(num_nodes, -1, dtype=np.int32)
    leaf_item[num_nodes - n:] = items  # leaves are the last n nodes, in row order

    max_children, first = [], 0
    sizes = [1] + depth_counts
    for d in range(num_levels):
      max_children.append(int(child_count[first:first + sizes[d]].max()))
      first += sizes[d]
    assert num_edges < np.iinfo(np.int32).max
    return cls(
        child_start=jnp.asarray(child_start.astype(np.int32)),
        child_code=jnp.asarray(child_code),
        child_node=jnp.asarray(child_node),
        leaf_item=jnp.asarray(leaf_item),
        num_levels=num_levels,
        max_children=tuple(max_children),
        vocab_sizes=vocab_sizes,
    )

  def subset(self, items: np.ndarray) -> "PrefixTrie":
    """The trie of a candidate pool: only ``items`` (which must all be in this trie).

    The vocabulary sizes are kept, so step functions see the same logit shapes.
    """
    items = np.unique(np.asarray(items).reshape(-1))
    all_codes, all_items = self.paths()
    pos = np.searchsorted(all_items, items)
    pos_c = np.minimum(pos, all_items.size - 1)
    missing = all_items[pos_c] != items
    if missing.any():
      raise ValueError(f"item {int(items[missing][0])} is not in the trie")
    return PrefixTrie.from_codes(all_codes[pos_c], items, self.vocab_sizes)

  @classmethod
  def forest(cls, tries: Sequence["PrefixTrie"]) -> tuple["PrefixTrie", np.ndarray]:
    """Several candidate pools in one trie, one root per pool, so one batch can mix pools.

    The result is the disjoint union of the pools' tries: pool ``p``'s nodes and edges keep
    their order, offset past those of pools ``0..p-1``; ``roots[p]`` is its root node.
    Beam search started at ``roots[p]`` (``beam_search(..., root=...)``) can only reach pool
    ``p``'s leaves. ``max_children`` is the per-level maximum over the pools; every pool must
    have the same ``num_levels`` and ``vocab_sizes``. Padding of an input trie is dropped.
    The host-side queries (``walk``, ``contains``, ``lookup``, ``paths``) start at node 0, i.e.
    see pool 0 only: query the pools' own tries instead.

    Returns:
      ``(forest, roots [P] int32)``.
    """
    if not tries:
      raise ValueError("a forest needs at least one trie")
    levels, vocab = tries[0].num_levels, tries[0].vocab_sizes
    for i, t in enumerate(tries):
      if t.num_levels != levels or t.vocab_sizes != vocab:
        raise ValueError(f"trie {i} has num_levels {t.num_levels} and vocab_sizes {t.vocab_sizes}; "
                         f"trie 0 has {levels} and {vocab}: every pool must share them")
    starts, codes, nodes, leaves, roots = [], [], [], [], []
    node_off = edge_off = 0
    for t in tries:
      cs = np.asarray(t.child_start).astype(np.int64)
      real = int(cs[-1])
      starts.append(cs[:-1] + edge_off)
      codes.append(np.asarray(t.child_code)[:real])
      nodes.append(np.asarray(t.child_node)[:real].astype(np.int64) + node_off)
      leaves.append(np.asarray(t.leaf_item))
      roots.append(node_off)
      node_off += t.num_nodes
      edge_off += real
    mc = tuple(max(t.max_children[l] for t in tries) for l in range(levels))
    forest = cls(
        child_start=jnp.asarray(np.concatenate(starts + [np.asarray([edge_off])]).astype(np.int32)),
        child_code=jnp.asarray(np.concatenate(codes).astype(np.int32)),
        child_node=jnp.asarray(np.concatenate(nodes).astype(np.int32)),
        leaf_item=jnp.asarray(np.concatenate(leaves).astype(np.int32)),
        num_levels=levels, max_children=mc, vocab_sizes=vocab)
    return forest, np.asarray(roots, np.int32)

  def pad(self, num_nodes: int, num_edges: int,
          max_children: Optional[Sequence[int]] = None) -> "PrefixTrie":
    """The same trie with arrays padded to fixed sizes (and wider static ``max_children``).

    Tries of different candidate pools padded to one shape (and one ``max_children``)
    share a compiled beam search. Padding nodes have no children and no item; padding
    edges are unreachable.
    """
    cur_nodes, cur_edges = self.num_nodes, self.num_edges
    if num_nodes < cur_nodes or num_edges < cur_edges:
      raise ValueError(f"cannot pad ({cur_nodes} nodes, {cur_edges} edges) down to "
                       f"({num_nodes}, {num_edges})")
    mc = self.max_children if max_children is None else tuple(int(m) for m in max_children)
    if len(mc) != self.num_levels or any(a < b for a, b in zip(mc, self.max_children)):
      raise ValueError(f"max_children {mc} must be per level and >= {self.max_children}")
    cs = np.asarray(self.child_start)
    child_start = np.concatenate([cs, np.full(num_nodes - cur_nodes, cs[-1], cs.dtype)])
    pad_e = num_edges - cur_edges
    return PrefixTrie(
        child_start=jnp.asarray(child_start),
        child_code=jnp.concatenate([self.child_code, jnp.zeros(pad_e, jnp.int32)]),
        child_node=jnp.concatenate([self.child_node, jnp.zeros(pad_e, jnp.int32)]),
        leaf_item=jnp.concatenate([self.leaf_item, jnp.full(num_nodes - cur_nodes, -1, jnp.int32)]),
        num_levels=self.num_levels,
        max_children=mc,
        vocab_sizes=self.vocab_sizes,
    )

  # ------------------------------------------------------------------ under jit

  def _walk(self, codes: jax.Array, root: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Traceable: ``(node, ok)`` [B, G] after following ``codes [B, G, d]`` (d <= L) from each
    row's ``root [B]`` (default node 0); ``ok`` is False (and the node 0) where a code is not a
    child. Each level gathers the node's ``max_children[level]`` edges, as the decoder does."""
    B, G, d = codes.shape
    num_edges = self.child_code.shape[0]
    node = jnp.zeros((B, G), jnp.int32) if root is None else jnp.broadcast_to(
        jnp.asarray(root, jnp.int32).reshape(B, 1), (B, G))
    ok = jnp.ones((B, G), bool)
    for level in range(d):
      k = self.max_children[level]
      start = self.child_start[node]
      offs = jnp.arange(k, dtype=jnp.int32)
      edge = jnp.minimum(start[..., None] + offs, num_edges - 1)  # [B, G, k]
      hit = (offs < (self.child_start[node + 1] - start)[..., None]) & (self.child_code[edge] == codes[..., level:level + 1])
      ok &= hit.any(axis=-1)
      node = jnp.where(ok, self.child_node[jnp.take_along_axis(edge, jnp.argmax(hit, axis=-1)[..., None], -1)[..., 0]], 0)
    return node, ok

  def find(self, codes: jax.Array, root: Optional[jax.Array] = None) -> jax.Array:
    """Traceable `lookup`: the item at each full path ``codes [B, G, L]`` starting from each
    row's ``root [B]`` (default node 0; a pool's root in a forest), ``-1`` where the path is
    not in the trie (or not under that root)."""
    if codes.shape[-1] != self.num_levels:
      raise ValueError(f"codes must be [B, G, {self.num_levels}], got {codes.shape}")
    node, ok = self._walk(codes, root)
    return jnp.where(ok, self.leaf_item[node], -1).astype(jnp.int32)

  def last_level_children(self, prefixes: jax.Array, root: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Traceable: the codes that may follow each prefix ``prefixes [B, G, L-1]`` at the last
    level, ``(codes [B, G, k], is_child [B, G, k])`` with ``k = max_children[L-1]`` (no child
    where the prefix is not in the trie)."""
    if prefixes.shape[-1] != self.num_levels - 1:
      raise ValueError(f"prefixes must be [B, G, {self.num_levels - 1}], got {prefixes.shape}")
    node, ok = self._walk(prefixes, root)
    k = self.max_children[-1]
    start = self.child_start[node]
    offs = jnp.arange(k, dtype=jnp.int32)
    edge = jnp.minimum(start[..., None] + offs, self.child_code.shape[0] - 1)
    is_child = ok[..., None] & (offs < (self.child_start[node + 1] - start)[..., None])
    return self.child_code[edge], is_child

  # ------------------------------------------------------------------ host-side queries

  @property
  def num_nodes(self) -> int:
    return int(self.leaf_item.shape[0])

  @property
  def num_edges(self) -> int:
    return int(self.child_code.shape[0])

  @property
  def num_items(self) -> int:
    """Number of leaves (items); computed on the host."""
    return int((np.asarray(self.leaf_item) >= 0).sum())

  def _edge_keys(self):
    cs = np.asarray(self.child_start).astype(np.int64)
    counts = np.diff(cs)
    src = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    vmax = max(self.vocab_sizes)
    keys = src * vmax + np.asarray(self.child_code)[:cs[-1]].astype(np.int64)
    return keys, vmax

  def walk(self, codes: np.ndarray) -> np.ndarray:
    """Node reached by each prefix ``codes [M, d]`` (``d <= L``), ``-1`` if not a valid prefix."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] > self.num_levels:
      raise ValueError(f"codes must be [M, d<= {self.num_levels}], got {codes.shape}")
    keys, vmax = self._edge_keys()
    child_node = np.asarray(self.child_node)
    node = np.zeros(codes.shape[0], dtype=np.int64)
    ok = np.ones(codes.shape[0], dtype=bool)
    for d in range(codes.shape[1]):
      c = codes[:, d].astype(np.int64)
      ok &= (c >= 0) & (c < vmax)
      q = node * vmax + np.clip(c, 0, vmax - 1)
      e = np.minimum(np.searchsorted(keys, q), keys.size - 1)
      ok &= keys[e] == q
      node = np.where(ok, child_node[e], 0)
    return np.where(ok, node, -1)

  def contains(self, codes: np.ndarray) -> np.ndarray:
    """``[M] bool``: whether each row of ``codes [M, d]`` is a valid path (or prefix if d < L)."""
    return self.walk(codes) >= 0

  def lookup(self, codes: np.ndarray) -> np.ndarray:
    """``[M] int32``: the item at each full path ``codes [M, L]``, ``-1`` if not in the trie."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.num_levels:
      raise ValueError(f"codes must be [M, {self.num_levels}], got {codes.shape}")
    node = self.walk(codes)
    return np.where(node >= 0, np.asarray(self.leaf_item)[np.maximum(node, 0)], -1).astype(np.int32)

  def paths(self) -> tuple[np.ndarray, np.ndarray]:
    """All leaves: ``(codes [n, L] int32, items [n] int32)``, sorted by item."""
    cs = np.asarray(self.child_start).astype(np.int64)
    counts = np.diff(cs)
    src = np.repeat(np.arange(counts.size, dtype=np.int64), counts)  # source node of each edge
    child_node = np.asarray(self.child_node)[:cs[-1]]
    child_code = np.asarray(self.child_code)[:cs[-1]]
    parent = np.full(self.num_nodes, -1, dtype=np.int64)
    parent[child_node] = src
    in_code = np.zeros(self.num_nodes, dtype=np.int32)
    in_code[child_node] = child_code
    leaf_item = np.asarray(self.leaf_item)
    leaves = np.flatnonzero(leaf_item >= 0)
    codes = np.zeros((leaves.size, self.num_levels), dtype=np.int32)
    node = leaves
    for d in range(self.num_levels - 1, -1, -1):
      codes[:, d] = in_code[node]
      node = parent[node]
    items = leaf_item[leaves]
    order = np.argsort(items, kind="stable")
    return codes[order], items[order]
