"""The ring-order solver against brute force (pyccl.ringopt)."""

from __future__ import annotations

import itertools
import random

import pytest
from pyccl import ringopt as R


def brute(bw: list[list[float]], lat: list[list[float]], nbytes: float) -> float:
    g = R._grouped(bw)
    n = len(bw)
    return min(R.ring_time([0, *p], g, lat, nbytes) for p in itertools.permutations(range(1, n)))


def random_matrices(rng: random.Random, n: int) -> tuple[list[list[float]], list[list[float]]]:
    bw = [[rng.choice([10e6, 25e6, 50e6, 100e6, 400e6]) * rng.uniform(0.5, 2.0) for _ in range(n)] for _ in range(n)]
    lat = [[rng.uniform(0.0005, 0.08) for _ in range(n)] for _ in range(n)]
    return bw, lat


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_exact_matches_brute_force_on_random_asymmetric_matrices(n: int) -> None:
    rng = random.Random(n)
    for trial in range(12 if n <= 7 else 4):
        bw, lat = random_matrices(rng, n)
        nbytes = rng.choice([1 << 20, 64 << 20, 1 << 30])
        order = R.solve(bw, lat, nbytes)
        assert sorted(order) == list(range(n)) and order[0] == 0
        got = R.ring_time(order, R._grouped(bw), lat, nbytes)
        assert got == pytest.approx(brute(bw, lat, nbytes), rel=1e-9), (n, trial)


@pytest.mark.parametrize("n", [8, 9])
def test_heuristic_is_close_to_brute_force(n: int) -> None:
    rng = random.Random(100 + n)
    ratios = []
    for _ in range(4):
        bw, lat = random_matrices(rng, n)
        order = R.solve(bw, lat, 64 << 20, exact_limit=0)
        assert sorted(order) == list(range(n))
        ratios.append(R.ring_time(order, R._grouped(bw), lat, 64 << 20) / brute(bw, lat, 64 << 20))
    assert max(ratios) < 1.10, ratios


def two_regions(n_a: int, n_b: int, rng: random.Random) -> tuple[list[list[float]], list[list[float]], list[str]]:
    regions = ["a"] * n_a + ["b"] * n_b
    rng.shuffle(regions)
    n = len(regions)
    bw = [[0.0] * n for _ in range(n)]
    lat = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            same = regions[i] == regions[j]
            bw[i][j] = (500e6 if same else 40e6) * rng.uniform(0.95, 1.05)  # measurement noise
            lat[i][j] = (0.001 if same else 0.040) * rng.uniform(0.98, 1.02)
    return bw, lat, regions


@pytest.mark.parametrize("n_a,n_b,limit", [(3, 3, 13), (6, 6, 13), (4, 5, 13), (10, 10, 13), (7, 9, 0)])
def test_two_regions_are_crossed_exactly_twice(n_a: int, n_b: int, limit: int) -> None:
    rng = random.Random(n_a * 100 + n_b)
    bw, lat, regions = two_regions(n_a, n_b, rng)
    order = R.solve(bw, lat, 64 << 20, exact_limit=limit)
    assert R.crossings(order, regions) == 2


def test_solver_is_deterministic() -> None:
    rng = random.Random(7)
    bw, lat = random_matrices(rng, 16)
    assert R.solve(bw, lat) == R.solve([row[:] for row in bw], [row[:] for row in lat])


def test_fill_uses_reverse_then_region_then_worst() -> None:
    measured = {(0, 1): (100.0, 0.01), (2, 3): (50.0, 0.02)}
    bw, lat = R.fill(4, measured, ["x", "x", "y", "y"])
    assert bw[1][0] == 100.0 and lat[1][0] == 0.01  # reverse direction
    assert bw[0][2] == 50.0  # no region pair measured for (x, y): the worst link
    bw2, _ = R.fill(4, {(0, 1): (100.0, 0.01), (0, 2): (30.0, 0.05)}, ["x", "x", "y", "y"])
    assert bw2[1][3] == 30.0  # region pair (x, y) measured once: its median


def test_insert_cheapest_places_a_joiner_next_to_its_region() -> None:
    rng = random.Random(3)
    bw, lat, regions = two_regions(3, 3, rng)
    full = R.solve(bw, lat)
    last = full[-1]
    without = [p for p in full if p != last]
    g = R._grouped(bw)
    placed = R.insert_cheapest(without, last, lambda o: R.ring_time(o, g, lat, 64 << 20))
    assert R.crossings(placed, regions) == 2


def geo(regions: list[str], rng: random.Random) -> tuple[list[list[float]], list[list[float]]]:
    n = len(regions)
    bw = [[(500e6 if regions[i] == regions[j] else 40e6) * rng.uniform(0.95, 1.05) for j in range(n)]
          for i in range(n)]
    lat = [[(0.001 if regions[i] == regions[j] else 0.040) * rng.uniform(0.98, 1.02) for j in range(n)]
           for i in range(n)]
    return bw, lat


@pytest.mark.parametrize("regions", [list("ababab"), list("abcabc"), list("aabbcc"), list("abcdabcd")])
def test_shared_pipes_between_regions_match_brute_force(regions: list[str]) -> None:
    rng = random.Random(len(regions))
    bw, lat = geo(regions, rng)
    order = R.solve(bw, lat, 64 << 20, regions=regions)
    g = R._grouped(bw)
    n = len(regions)
    best = min(R.ring_time([0, *p], g, lat, 64 << 20, regions) for p in itertools.permutations(range(1, n)))
    assert R.ring_time(order, g, lat, 64 << 20, regions) == pytest.approx(best, rel=1e-9)
    assert R.crossings(order, regions) == len(set(regions))


def test_join_order_is_slower_under_shared_pipes() -> None:
    regions = list("abababababab")
    bw, lat = geo(regions, random.Random(5))
    g = R._grouped(bw)
    join = list(range(12))
    best = R.solve(bw, lat, 64 << 20, regions=regions)
    assert R.crossings(best, regions) == 2
    assert R.ring_time(join, g, lat, 64 << 20, regions) > 5 * R.ring_time(best, g, lat, 64 << 20, regions)


def test_rtt_regions_finds_the_latency_clusters() -> None:
    regions = list("abcabcab")
    _, lat = geo(regions, random.Random(9))
    labels = R.rtt_regions(lat)
    assert len(set(labels)) == 3
    assert all((labels[i] == labels[j]) == (regions[i] == regions[j]) for i in range(8) for j in range(8))
    assert R.rtt_regions([[0, 0.001, 0.0012], [0.001, 0, 0.0011], [0.0012, 0.0011, 0]]) == [0, 0, 0]
