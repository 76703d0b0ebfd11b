"""Identity from face descriptors, in pure numpy: distances, the neighbour graph, Chinese
whispers (the clustering dlib itself uses for faces), the vote that places one new face, and the
pairwise scores the evaluation reports.

Descriptors are the face backbone's 128-d vectors (``dlib-face-v1``), compared by Euclidean
distance; dlib's own verification threshold is 0.6. Everything here is deterministic: the same
descriptors, order and seed give the same clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DIM = 128
Floats = npt.NDArray[np.float32]
Vectors = npt.NDArray[np.float32] | npt.NDArray[np.float16]
Ints = npt.NDArray[np.int64]


def unpack(blob: bytes) -> Floats:
    """A stored descriptor (128 little-endian float16) as float32."""
    v = np.frombuffer(blob, "<f2")
    if v.size != DIM:
        raise ValueError(f"a face descriptor has {DIM} float16 values ({2 * DIM} bytes), got {len(blob)} bytes")
    return v.astype(np.float32)


def stack(blobs: Sequence[bytes]) -> Floats:
    """Many stored descriptors as one (n, 128) float32 matrix."""
    if not blobs:
        return np.zeros((0, DIM), np.float32)
    m = np.frombuffer(b"".join(blobs), "<f2")
    if m.size != DIM * len(blobs):
        raise ValueError(f"face descriptors must be {2 * DIM} bytes each")
    return m.reshape(-1, DIM).astype(np.float32)


def distances(X: Vectors, q: Floats, *, block: int = 262_144) -> Floats:  # noqa: N803 (a matrix)
    """Euclidean distance of every row of ``X`` (float16 or float32) to ``q``."""
    q = np.asarray(q, np.float32)
    out = np.empty(len(X), np.float32)
    qq = float(q @ q)
    for s in range(0, len(X), block):
        x = np.asarray(X[s : s + block], np.float32)
        out[s : s + block] = np.einsum("ij,ij->i", x, x) - 2.0 * (x @ q) + qq
    return np.sqrt(np.maximum(out, 0.0, out=out), out=out)


@dataclass(frozen=True)
class Graph:
    """Undirected neighbour graph in CSR form: the neighbours of node ``i`` are
    ``indices[indptr[i]:indptr[i+1]]`` at ``dist`` (each edge appears in both directions)."""

    indptr: Ints
    indices: Ints
    dist: Floats

    def neighbours(self, i: int) -> tuple[Ints, Floats]:
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.dist[a:b]


def graph(X: Floats, threshold: float, *, block: int = 2048) -> Graph:  # noqa: N803
    """Every pair of rows closer than ``threshold`` (blocked brute force: O(n^2) distances,
    O(edges) memory; fine up to some 10^5 faces on one core)."""
    X = np.asarray(X, np.float32)  # noqa: N806
    n = len(X)
    sq = np.einsum("ij,ij->i", X, X)
    rows: list[Ints] = []
    cols: list[Ints] = []
    dists: list[Floats] = []
    t2 = threshold * threshold
    for s in range(0, n, block):
        xb = X[s : s + block]
        d2 = sq[s : s + block, None] - 2.0 * (xb @ X.T) + sq[None, :]
        r, c = np.nonzero(d2 < t2)
        keep = c > r + s  # each unordered pair once, no self pairs
        r, c = r[keep] + s, c[keep]
        rows.append(r.astype(np.int64))
        cols.append(c.astype(np.int64))
        dists.append(np.sqrt(np.maximum(d2[r - s, c], 0.0)).astype(np.float32))
    r = np.concatenate(rows + [np.zeros(0, np.int64)])
    c = np.concatenate(cols + [np.zeros(0, np.int64)])
    d = np.concatenate(dists + [np.zeros(0, np.float32)])
    src, dst, dd = np.concatenate([r, c]), np.concatenate([c, r]), np.concatenate([d, d])
    order = np.lexsort((dst, src))
    src, dst, dd = src[order], dst[order], dd[order]
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    return Graph(np.cumsum(indptr), dst, dd)


LINKAGE_LIMIT = 15_000  # faces per exact complete-linkage run: its distance matrix is n^2 / 2 doubles


def clusters(X: Floats, threshold: float, *, seeds: npt.NDArray[np.bool_] | None = None) -> Ints:  # noqa: N803
    """Complete-linkage clusters: every two faces of a cluster are closer than ``threshold``.

    Exact per connected component of the ``threshold`` graph (a cluster never spans two).
    A component larger than :data:`LINKAGE_LIMIT` is first split by Chinese whispers, then each
    part is clustered exactly. Only ``seeds`` rows are clustered (default all); the others get
    -1. Labels are numbered by first member."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    X = np.asarray(X, np.float32)  # noqa: N806
    n = len(X)
    use = np.ones(n, bool) if seeds is None else np.asarray(seeds, bool)
    idx = np.flatnonzero(use)
    out = np.full(n, -1, np.int64)
    if not len(idx):
        return out
    g = graph(X[idx], threshold)
    adj = csr_matrix((np.ones(len(g.indices)), g.indices, g.indptr), shape=(len(idx), len(idx)))
    _, comp = connected_components(adj, directed=False)
    parts: list[Ints] = []
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        if len(members) <= LINKAGE_LIMIT:
            parts.append(members)
            continue
        sub = graph(X[idx[members]], threshold)
        cw = chinese_whispers(sub, np.arange(len(members)), np.zeros(len(members), bool))
        parts += [members[cw == lab] for lab in np.unique(cw)]
    next_label = 0
    for members in parts:
        if len(members) == 1:
            lab = np.zeros(1, np.int64)
        else:
            z = linkage(X[idx[members]].astype(np.float64), method="complete", metric="euclidean")
            lab = fcluster(z, threshold, criterion="distance").astype(np.int64) - 1
        out[idx[members]] = lab + next_label
        next_label += int(lab.max()) + 1
    return canonical(out)


def join(X: Floats, labels: Ints, q: Floats, threshold: float) -> int:  # noqa: N803
    """The cluster a new face joins under complete linkage: of the labelled clusters with a
    member within ``threshold``, the one whose farthest member is nearest, if that is within
    ``threshold``; -1 otherwise."""
    d = distances(X, q)
    near = np.unique(labels[(d < threshold) & (labels >= 0)])
    best, best_far = -1, threshold
    for lab in near.tolist():
        far = float(d[labels == lab].max())
        if far < best_far:
            best, best_far = lab, far
    return best


def vote(labels: Sequence[int], dist: Sequence[float]) -> int:
    """The label a face takes from its labelled neighbours (``-1`` = unlabelled, ignored): the
    most frequent, ties to the one with the nearest member; -1 when none is labelled."""
    best, best_key = -1, (0, 0.0)
    counts: dict[int, int] = {}
    closest: dict[int, float] = {}
    for lab, d in zip(labels, dist, strict=True):
        if lab < 0:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        closest[lab] = min(closest.get(lab, np.inf), float(d))
    for lab in sorted(counts):
        key = (counts[lab], -closest[lab])
        if best < 0 or key > best_key:
            best, best_key = lab, key
    return best


def chinese_whispers(g: Graph, labels: Ints, fixed: npt.NDArray[np.bool_], *, seed: int = 0, sweeps: int = 30) -> Ints:
    """Chinese whispers (Biemann 2006; dlib's ``chinese_whispers``) with unit edge weights.

    ``labels``: the starting label per node (``-1``: none; such a node takes its neighbours'
    label and stays -1 when it has no labelled neighbour, so it never starts a cluster of its
    own). ``fixed`` nodes keep their label (an examiner's decision) and pass it on. Nodes are
    visited in a seeded random order per sweep until a sweep changes nothing."""
    lab = np.array(labels, np.int64)
    rng = np.random.default_rng(seed)
    free = np.flatnonzero(~np.asarray(fixed, bool))
    ptr, nb, dist = g.indptr, g.indices, g.dist
    for _ in range(sweeps):
        changed = False
        for i in rng.permutation(free):
            a, b = ptr[i], ptr[i + 1]
            if a == b:
                continue
            new = vote(lab[nb[a:b]].tolist(), dist[a:b].tolist())
            if new >= 0 and new != lab[i]:
                lab[i] = new
                changed = True
        if not changed:
            break
    return lab


def canonical(labels: Ints) -> Ints:
    """Labels renumbered 0, 1, ... in order of first appearance (-1 stays -1)."""
    out = np.full(len(labels), -1, np.int64)
    seen: dict[int, int] = {}
    for i, v in enumerate(np.asarray(labels).tolist()):
        if v >= 0:
            out[i] = seen.setdefault(v, len(seen))
    return out


def pair_scores(truth: Sequence[object], pred: Ints) -> tuple[float, float]:
    """Pairwise precision and recall of a clustering: of the pairs put together, the share that
    are the same identity; of the same-identity pairs, the share put together. An unclustered
    face (-1) is put together with nothing."""
    t = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)[1]
    p = np.asarray(pred, np.int64)

    def pairs(counts: npt.NDArray[np.int64]) -> int:
        return int((counts * (counts - 1) // 2).sum())

    together = pairs(np.unique(p[p >= 0], return_counts=True)[1])
    same = pairs(np.unique(t, return_counts=True)[1])
    both_keys = t[p >= 0].astype(np.int64) * (int(p.max(initial=0)) + 1) + p[p >= 0]
    both = pairs(np.unique(both_keys, return_counts=True)[1])
    return (both / together if together else 1.0), (both / same if same else 1.0)


def adjusted_rand(a: Ints, b: Ints) -> float:
    """Adjusted Rand index of two labelings (each -1 counted as a cluster of its own)."""
    a = _singletons(np.asarray(a, np.int64))
    b = _singletons(np.asarray(b, np.int64))
    n = len(a)
    if n < 2:
        return 1.0

    def c2(x: npt.NDArray[np.int64]) -> float:
        return float((x * (x - 1) / 2).sum())

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.unique(ia.astype(np.int64) * (ib.max() + 1) + ib, return_counts=True)[1]
    sa, sb, sab = c2(np.bincount(ia)), c2(np.bincount(ib)), c2(joint)
    expected = sa * sb / c2(np.array([n]))
    top = (sa + sb) / 2
    return 1.0 if top == expected else (sab - expected) / (top - expected)


def _singletons(x: Ints) -> Ints:
    x = x.copy()
    neg = np.flatnonzero(x < 0)
    x[neg] = x.max(initial=0) + 1 + np.arange(len(neg))
    return x
