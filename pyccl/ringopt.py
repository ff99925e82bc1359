"""The ring order that makes an all-reduce fastest over measured links (pure).

A ring all-reduce over order ``r`` moves ``2 (n-1)/n x S`` bytes over every
ring link ``r[i] -> r[i+1]`` at the same time, in pipelined chunks, so its
time is about

    T(r) = 2 (n-1)/n x (S / min_e bw_e  +  sum_e lat_e)

the slowest link sets the pace (bottleneck) and every chunk's chain of hops
adds the one-way latencies of the ring (each segment crosses all links but
one, twice). Bandwidths are asymmetric (``bw[a][b]`` is a -> b) and noisy, so
they are first *grouped*: values within ``BW_TOLERANCE`` of each other (in
a chain) count as the same, the smallest of the group; without that, noise
of a few percent on equally slow links would outweigh real latency.

:func:`solve` is exact for ``n <= EXACT_LIMIT`` (Held-Karp dynamic
programming over subsets for the minimum latency cycle among links at least
as fast as each candidate bottleneck, best candidate first, stopping once
no slower bottleneck can win), and beyond that a deterministic heuristic:
cheapest-insertion construction, then Or-opt (move a run of 1-3 peers) and
2-opt (reverse a run) until no move improves ``T``. Orders are rotated to
start with index 0 (a ring has no start).

:func:`fill` completes a partly measured matrix (peers sample pairs when n is
large): a missing a -> b takes b -> a if measured, else the median of
measured pairs between the two peers' regions, else (nothing measured
between those regions) the fastest measured link inside one region and the
slowest between two, else the slowest (pessimistic).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["EXACT_LIMIT", "BW_TOLERANCE", "ring_time", "solve", "fill", "insert_cheapest", "crossings", "rtt_regions"]

EXACT_LIMIT = 13
BW_TOLERANCE = 0.15
RESTARTS = 6  # heuristic tour searches per bottleneck candidate, at most

Matrix = Sequence[Sequence[float]] | np.ndarray


def ring_time(order: Sequence[int], bw: Matrix, lat: Matrix, nbytes: float,
              regions: Sequence[Hashable] | None = None) -> float:
    """Estimated all-reduce time of ``nbytes`` over ring ``order``. With
    ``regions``, ring links from one region to another share that pipe: each
    gets the measured bandwidth divided by how many ring links use it."""
    n = len(order)
    if n < 2:
        return 0.0
    edges = [(order[i], order[(i + 1) % n]) for i in range(n)]
    if regions is None:
        slowest = min(bw[a][b] for a, b in edges)
    else:
        users = Counter((regions[a], regions[b]) for a, b in edges if regions[a] != regions[b])
        slowest = min(bw[a][b] / users.get((regions[a], regions[b]), 1) for a, b in edges)
    total_lat = sum(lat[a][b] for a, b in edges)
    return 2 * (n - 1) / n * (nbytes / max(slowest, 1e-9) + total_lat)


def _grouped(bw: Matrix) -> np.ndarray:
    """Bandwidths with near-equal values (chains within BW_TOLERANCE) set to their group's minimum."""
    arr = np.array(bw, dtype=np.float64)
    n = arr.shape[0]
    off = ~np.eye(n, dtype=bool)
    values = np.unique(arr[off])
    rep = {}
    low = values[0] if len(values) else 0.0
    prev = low
    for v in values:
        if v > prev * (1 + BW_TOLERANCE):
            low = v
        rep[float(v)] = float(low)
        prev = v
    out = arr.copy()
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = rep[float(arr[i, j])]
    return np.asarray(out, dtype=np.float64)


def _held_karp(w: np.ndarray) -> tuple[float, list[int]]:
    """Minimum-cost Hamiltonian cycle through 0 for cost matrix ``w`` (inf: no edge)."""
    n = w.shape[0]
    m = n - 1  # nodes 1..n-1 are bits 0..m-1
    full = (1 << m) - 1
    dp = np.full((1 << m, m), np.inf)
    parent = np.full((1 << m, m), -1, dtype=np.int16)
    for j in range(m):
        dp[1 << j, j] = w[0, j + 1]
    masks = np.arange(1 << m)
    popcount = np.array([bin(x).count("1") for x in range(1 << m)])
    sub_w = w[1:, 1:]
    for size in range(2, m + 1):
        layer = masks[popcount == size]
        for j in range(m):
            sel = layer[(layer >> j) & 1 == 1]
            if len(sel) == 0:
                continue
            prev = dp[sel ^ (1 << j)] + sub_w[:, j][None, :]  # (len, m): arrive at j from i
            best = np.argmin(prev, axis=1)
            dp[sel, j] = prev[np.arange(len(sel)), best]
            parent[sel, j] = best
    closing = dp[full] + w[1:, 0]
    last = int(np.argmin(closing))
    cost = float(closing[last])
    if not math.isfinite(cost):
        return cost, []
    path = []
    mask, j = full, last
    while j >= 0:
        path.append(j + 1)
        pj = int(parent[mask, j])
        mask ^= 1 << j
        j = pj
    return cost, [0, *reversed(path)]


def _solve_exact(bw: np.ndarray, lat: np.ndarray, nbytes: float) -> list[int]:
    n = bw.shape[0]
    factor = 2 * (n - 1) / n
    off = ~np.eye(n, dtype=bool)
    # Lower bound on the latency term: the best cycle with every link allowed.
    base_w = np.where(off, lat, np.inf)
    min_lat, best_order = _held_karp(base_w)
    best = ring_time(best_order, bw, lat, nbytes)
    for b in sorted(set(bw[off].tolist()), reverse=True):
        if factor * (nbytes / b + min_lat) >= best - 1e-15:
            break  # a bottleneck this slow cannot beat the best ring found
        w = np.where(off & (bw >= b), lat, np.inf)
        cost, order = _held_karp(w)
        if order:
            t = ring_time(order, bw, lat, nbytes)
            if t < best - 1e-15:
                best, best_order = t, order
    return best_order


def _improve(order: list[int], cost: object) -> list[int]:
    """Or-opt and 2-opt, first improvement in a fixed scan order, until none improves."""
    assert callable(cost)
    n = len(order)
    best = cost(order)
    improved = True
    while improved:
        improved = False
        for seg in (1, 2, 3):  # Or-opt: move order[i:i+seg] elsewhere (direction kept)
            for i in range(1, n - seg + 1):
                run, rest = order[i:i + seg], order[:i] + order[i + seg:]
                for k in range(1, len(rest) + 1):
                    cand = rest[:k] + run + rest[k:]
                    c = cost(cand)
                    if c < best - 1e-12:
                        order, best, improved = cand, c, True
                        break
                if improved:
                    break
            if improved:
                break
        if improved:
            continue
        for i in range(1, n - 1):  # 2-opt: reverse order[i:j]
            for j in range(i + 2, n + 1):
                cand = order[:i] + order[i:j][::-1] + order[j:]
                c = cost(cand)
                if c < best - 1e-12:
                    order, best, improved = cand, c, True
                    break
            if improved:
                break
    return order


def insert_cheapest(order: list[int], node: int, cost: object) -> list[int]:
    """``order`` with ``node`` inserted where ``cost`` (a function of an order) is least;
    ties go to the earliest position (deterministic)."""
    assert callable(cost)
    if not order:
        return [node]
    cands = [order[:k] + [node] + order[k:] for k in range(1, len(order) + 1)]
    return min(cands, key=lambda o: cost(o))


def solve(bw: Matrix, lat: Matrix, nbytes: float = 64 << 20, exact_limit: int = EXACT_LIMIT,
          regions: Sequence[Hashable] | None = None) -> list[int]:
    """The ring order (a permutation of range(n), starting with 0) with the least
    estimated all-reduce time; ``bw[a][b]`` in bytes/s and ``lat[a][b]`` one-way
    seconds from a to b (diagonals ignored).

    With ``regions`` (a label per peer) links between two regions are taken
    to share one pipe (:func:`ring_time`), which per-link measurements
    cannot show: the ring solved per link competes with the best ring that
    visits each region in one run (latency between regions made prohibitive
    for the search), and the one faster under sharing wins."""
    n = len(bw)
    g = _grouped(bw)
    latm = np.array(lat, dtype=np.float64)
    if n <= 3:
        cands = [[0, 1, 2], [0, 2, 1]] if n == 3 else [list(range(n))]
        return min(cands, key=lambda o: ring_time(o, g, latm, nbytes, regions))

    def core(latency: np.ndarray) -> list[int]:
        if n <= exact_limit:
            return _solve_exact(g, latency, nbytes)
        return _solve_heuristic(g, latency, nbytes)

    cands = [core(latm)]
    if regions is not None and len(set(regions)) > 1:
        differ = np.array([[regions[i] != regions[j] for j in range(n)] for i in range(n)], dtype=np.float64)
        cands.append(core(latm + 1e3 * (float(latm.max()) + 1.0) * differ))
    return min(cands, key=lambda o: ring_time(o, g, latm, nbytes, regions))


def rtt_regions(lat: Matrix, gap: float = 3.0) -> list[int]:
    """Regions told apart by latency: peers closer than the widest gap (a ratio of
    at least ``gap``) in the sorted one-way latencies are in one region
    (single linkage). One region (all 0) when no such gap exists."""
    arr = np.array(lat, dtype=np.float64)
    n = arr.shape[0]
    sym = (arr + arr.T) / 2
    values = sorted(v for v in set(sym[~np.eye(n, dtype=bool)].tolist()) if v > 0)
    ratios = [(values[i + 1] / values[i], i) for i in range(len(values) - 1)]
    if not ratios or max(ratios)[0] < gap:
        return [0] * n
    i = max(ratios)[1]
    threshold = math.sqrt(values[i] * values[i + 1])
    label = list(range(n))

    def root(x: int) -> int:
        while label[x] != x:
            x = label[x]
        return x

    for a in range(n):
        for b in range(n):
            if a != b and sym[a, b] <= threshold:
                label[root(b)] = root(a)
    roots: dict[int, int] = {}
    return [roots.setdefault(root(a), len(roots)) for a in range(n)]


def _cycle_sum(order: Sequence[int], w: np.ndarray) -> float:
    n = len(order)
    return float(sum(w[order[i], order[(i + 1) % n]] for i in range(n)))


def _solve_heuristic(bw: np.ndarray, lat: np.ndarray, nbytes: float) -> list[int]:
    """Bottleneck candidates, each a minimum-latency tour search among links at
    least that fast (links below it cost a penalty, so local moves still see a
    gradient), then the true objective polishes the best."""
    n = bw.shape[0]
    factor = 2 * (n - 1) / n
    off = ~np.eye(n, dtype=bool)
    penalty = 1e3 * (float(lat[off].max()) + 1.0)

    def feasible(o: Sequence[int], b: float) -> bool:
        return all(bw[o[i], o[(i + 1) % n]] >= b for i in range(n))

    def tour(b: float) -> list[int]:
        w = lat + np.where(bw >= b, 0.0, penalty)

        def cost(o: Sequence[int]) -> float:
            return _cycle_sum(o, w)

        # Local search can miss a tour among sparse fast links: restart from
        # other insertion sequences (a fixed seed: the same answer every time).
        rng = random.Random(0)
        nodes = list(range(1, n))
        best: list[int] = []
        for _ in range(RESTARTS):
            order = [0]
            for node in nodes:
                order = insert_cheapest(order, node, cost)
            order = _improve(order, cost)
            if not best or cost(order) < cost(best):
                best = order
            if feasible(best, b):
                break
            rng.shuffle(nodes)
        return best

    levels = sorted(set(bw[off].tolist()), reverse=True)
    # The fastest bottleneck a tour reaches (binary search over the levels).
    lo, hi = 0, len(levels) - 1  # levels[hi] (the slowest) is always feasible
    best_order = tour(levels[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        o = tour(levels[mid])
        if feasible(o, levels[mid]):
            hi, best_order = mid, o
        else:
            lo = mid + 1
    best = ring_time(best_order, bw, lat, nbytes)
    # A slower bottleneck can still win on latency: try a few, while they can.
    lat_floor = float(np.where(off, lat, np.inf).min(axis=1).sum())
    for b in levels[hi + 1:hi + 9]:
        if factor * (nbytes / b + lat_floor) >= best:
            break
        o = tour(b)
        t = ring_time(o, bw, lat, nbytes)
        if t < best - 1e-15:
            best, best_order = t, o
    return _improve(best_order, lambda o: ring_time(o, bw, lat, nbytes))


def fill(n: int, measured: Mapping[tuple[int, int], tuple[float, float]],
         regions: Sequence[str | None] | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """(bw, lat) matrices from measurements ``(a, b) -> (bw B/s, one-way s)``, filling gaps
    (see the module docstring)."""
    bw = [[math.inf] * n for _ in range(n)]
    lat = [[0.0] * n for _ in range(n)]
    if measured:
        worst_bw = min(v[0] for v in measured.values())
        worst_lat = max(v[1] for v in measured.values())
        best_bw = max(v[0] for v in measured.values())
        best_lat = min(v[1] for v in measured.values())
    else:
        worst_bw, worst_lat, best_bw, best_lat = 1.0, 0.0, 1.0, 0.0
    by_region: dict[tuple[str, str], list[tuple[float, float]]] = {}
    if regions is not None:
        for (a, b), m in measured.items():
            ka, kb = regions[a], regions[b]
            if ka is not None and kb is not None:
                by_region.setdefault((ka, kb), []).append(m)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            v = measured.get((a, b)) or measured.get((b, a))
            ra: str | None = regions[a] if regions is not None else None
            rb: str | None = regions[b] if regions is not None else None
            if v is None and ra is not None and rb is not None:
                pool = by_region.get((ra, rb)) or by_region.get((rb, ra))
                if pool:
                    v = (float(np.median([p[0] for p in pool])), float(np.median([p[1] for p in pool])))
                elif ra == rb:
                    v = (best_bw, best_lat)  # one region, never measured inside: as good as the best link
            if v is None:
                v = (worst_bw, worst_lat)
            bw[a][b], lat[a][b] = v
    return bw, lat


def crossings(order: Sequence[int], regions: Sequence[str | None]) -> int:
    """How many ring links join peers of different regions."""
    n = len(order)
    return sum(1 for i in range(n) if regions[order[i]] != regions[order[(i + 1) % n]])
