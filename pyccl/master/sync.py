"""Shared-state sync, master side: the pure planner and the `sync` frame's key list.

The master never sees tensor bytes. Each participant of a sync round reports
its revision, its strategy and, per key, ``(name, dtype, shape, nbytes,
hash)``; :func:`plan_sync` turns those reports into a :class:`SyncPlan`:
who is rejected (and why), the target revision, the holders of the popular
copy, and which keys each peer must fetch. The rules are those of
``docs/architecture.md``, section "Shared state / The plan":

1. **Schema.** The key list (name, dtype, shape, nbytes) reported by the most
   peers is the group's (ties: the schema of the lowest peer id). A peer with
   another schema is rejected with a reason naming the first offending key.
2. **Revision.** With the group's last synced revision ``R`` known, a peer
   reporting more than ``R + 1`` is rejected ("skips ahead"). A group with no
   synced revision yet accepts any revision. The target ``T`` is the highest
   revision among the remaining peers that are not ``receive_only``.
3. **Popular copy.** Among the remaining non-``receive_only`` peers at ``T``,
   peers are grouped by their tuple of per-key hashes; the largest group wins
   (ties: the group holding the lowest peer id). Its members are the holders.
   If no remaining peer may send (all are ``receive_only``), there is no
   popular copy and every remaining peer is rejected.
4. **Fetches.** Every remaining peer that is not ``send_only`` fetches
   exactly the keys whose hash differs from the popular one (none if it only
   lags in revision). A ``send_only`` peer that differs is left alone and
   only noted.

Everything here is deterministic: peers are considered in peer-id order and
every tie goes to the lowest peer id, so the same reports always give the
same plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyccl.protocol import MAX_DIMS, MAX_DTYPE_LEN, MAX_KEY_NAME_LEN, MAX_STATE_KEYS, STRATEGIES, StateKey, parse_keys
from pyccl.wire import clip

__all__ = [
    "STRATEGIES",
    "MAX_STATE_KEYS",
    "MAX_KEY_NAME_LEN",
    "MAX_DTYPE_LEN",
    "MAX_DIMS",
    "StateKey",
    "SyncRequest",
    "SyncPlan",
    "plan_sync",
    "parse_keys",
]

@dataclass(frozen=True, slots=True)
class SyncRequest:
    """One participant's `sync` report plus its data-plane address (from its hello).

    ``keys`` are sorted by name without duplicates (the frame check enforces
    it); plain ``(name, dtype, shape, nbytes, hash)`` tuples are accepted and
    converted.
    """

    peer_id: int
    strategy: str
    revision: int
    keys: tuple[StateKey, ...]
    host: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if not all(type(k) is StateKey for k in self.keys):
            keys = tuple(StateKey(str(n), str(d), tuple(s), int(b), int(h)) for n, d, s, b, h in self.keys)
            object.__setattr__(self, "keys", keys)
        elif type(self.keys) is not tuple:
            object.__setattr__(self, "keys", tuple(self.keys))


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """The outcome of :func:`plan_sync`.

    Attributes:
        revision: the target revision ``T``; None when no peer could be
            planned (every participant rejected, or none at all).
        holders: peer ids holding the popular copy, ascending.
        holder_entries: ``(peer_id, host, port)`` of each holder, same order.
        fetch: every *planned* (not rejected) peer id -> the ``(key index,
            popular hash)`` pairs it must fetch, ascending by key index; an
            empty tuple for a peer that is up to date (or ``send_only``).
        rejected: rejected peer id -> a one-sentence reason.
        notes: things worth a log line that change nothing (a ``send_only``
            peer that differs from the popular copy).
    """

    revision: int | None
    holders: tuple[int, ...]
    holder_entries: tuple[tuple[int, str, int], ...]
    fetch: Mapping[int, tuple[tuple[int, int], ...]]
    rejected: Mapping[int, str]
    notes: tuple[str, ...]

    @property
    def planned(self) -> tuple[int, ...]:
        """Peer ids that take part in the transfer (holders included), ascending."""
        return tuple(sorted(self.fetch))

    def describe(self) -> str:
        """One log line: target, holders, who fetches how many keys."""
        if self.revision is None:
            return f"nothing to plan ({len(self.rejected)} rejected)"
        fetchers = {p: len(f) for p, f in sorted(self.fetch.items()) if f}
        fetch_txt = ", ".join(f"peer {p}: {n} key{'s' if n != 1 else ''}" for p, n in fetchers.items())
        return (
            f"target revision {self.revision}, holders {list(self.holders)}, "
            f"fetches {{{fetch_txt}}}" + (f", {len(self.rejected)} rejected" if self.rejected else "")
        )


# ------------------------------------------------------------------ planner


def _schema(req: SyncRequest) -> tuple[tuple[str, str, tuple[int, ...], int], ...]:
    return tuple((k.name, k.dtype, k.shape, k.nbytes) for k in req.keys)


def _hashes(req: SyncRequest) -> tuple[int, ...]:
    return tuple(k.hash for k in req.keys)


def _shape_txt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _schema_mismatch(mine: Sequence[StateKey], group: Sequence[tuple[str, str, tuple[int, ...], int]],
                     holders: int, total: int) -> str:
    """One sentence naming the first key in which ``mine`` differs from the group's schema."""
    prefix = f"shared state does not match the group's (the layout of {holders} of {total} peers): "
    my_names = {k.name for k in mine}
    group_names = {g[0] for g in group}
    odd = my_names ^ group_names
    if odd:
        first = min(odd)
        if first in my_names:
            return prefix + f"key {clip(first, 80)} is not in the group's state"
        return prefix + f"key {clip(first, 80)} of the group's state is missing"
    for k, (_, dtype, shape, nbytes) in zip(mine, group):
        name = clip(k.name, 80)
        if k.dtype != dtype:
            return prefix + f"key {name} has dtype {clip(k.dtype, 20)} where the group's has {clip(dtype, 20)}"
        if k.shape != shape:
            return prefix + f"key {name} has shape {_shape_txt(k.shape)} where the group's has {_shape_txt(shape)}"
        if k.nbytes != nbytes:
            return prefix + f"key {name} has {k.nbytes} bytes where the group's has {nbytes}"
    # Same names, same entries: only the order can differ (unsorted input).
    return prefix + "its keys are in another order"


def _same_schema(reqs: list[SyncRequest], rejected: dict[int, str]) -> list[SyncRequest]:
    """Rule 1: the most common layout wins; ties go to the lowest peer id
    (``reqs`` is sorted, and Counter keeps first-insertion order on ties).
    The others are rejected."""
    schemas = {r.peer_id: _schema(r) for r in reqs}
    counts = Counter(schemas[r.peer_id] for r in reqs)
    if len(counts) <= 1:
        return reqs
    group_schema, n_same = max(counts.items(), key=lambda kv: kv[1])  # max keeps the first on ties
    remaining = []
    for r in reqs:
        if schemas[r.peer_id] == group_schema:
            remaining.append(r)
        else:
            rejected[r.peer_id] = _schema_mismatch(r.keys, group_schema, n_same, len(reqs))
    return remaining


def _acceptable_revision(reqs: list[SyncRequest], group_revision: int | None,
                         rejected: dict[int, str]) -> list[SyncRequest]:
    """Rule 2: at most one step ahead of the group's last synced revision."""
    if group_revision is None:
        return reqs
    ok = []
    for r in reqs:
        if r.revision > group_revision + 1:
            rejected[r.peer_id] = (f"revision {r.revision} skips ahead of the group's revision {group_revision}: "
                                   "advance it by exactly 1 per sync")
        else:
            ok.append(r)
    return ok


def plan_sync(group_revision: int | None, requests: Iterable[SyncRequest]) -> SyncPlan:
    """Plan one sync round from the participants' reports (see the module docstring).

    Args:
        group_revision: the group's last synced revision, or None if the
            group has not synced yet (any revision is accepted).
        requests: one :class:`SyncRequest` per participant; order does not
            matter, peer ids must be distinct.

    Returns:
        The :class:`SyncPlan`. Every request ends up either in ``rejected``
        or in ``fetch`` (planned), never both.
    """
    reqs = sorted(requests, key=lambda r: r.peer_id)
    if len({r.peer_id for r in reqs}) != len(reqs):
        raise ValueError("duplicate peer ids in sync requests")
    rejected: dict[int, str] = {}
    notes: list[str] = []

    remaining = _same_schema(reqs, rejected)
    remaining = _acceptable_revision(remaining, group_revision, rejected)

    senders = [r for r in remaining if r.strategy != "receive_only"]
    if not senders:
        if remaining:
            why = (
                f"no participant can provide the shared state: all {len(remaining)} participants "
                f"with the group's layout and an acceptable revision are receive_only"
            )
            for r in remaining:
                rejected[r.peer_id] = why
        return SyncPlan(None, (), (), {}, rejected, tuple(notes))

    # 3. Popular copy: the largest set of identical hash tuples at T.
    target = max(r.revision for r in senders)
    by_content: dict[tuple[int, ...], list[SyncRequest]] = {}
    for r in senders:
        if r.revision == target:
            by_content.setdefault(_hashes(r), []).append(r)
    # dict order = order of each content's lowest peer id; max keeps the first on ties.
    popular, holder_reqs = max(by_content.items(), key=lambda kv: len(kv[1]))
    holders = tuple(r.peer_id for r in holder_reqs)
    holder_entries = tuple((r.peer_id, r.host, r.port) for r in holder_reqs)

    # 4. Fetches: exactly the keys whose hash differs from the popular one.
    fetch: dict[int, tuple[tuple[int, int], ...]] = {}
    for r in remaining:
        diff = tuple((i, h) for i, (k, h) in enumerate(zip(r.keys, popular)) if k.hash != h)
        if r.strategy == "send_only":
            fetch[r.peer_id] = ()
            if diff or r.revision != target:
                notes.append(
                    f"peer {r.peer_id} is send_only and differs from the popular copy "
                    f"({len(diff)} key{'s' if len(diff) != 1 else ''} differ, revision {r.revision}, "
                    f"target {target}): left alone"
                )
        else:
            fetch[r.peer_id] = diff
    return SyncPlan(target, holders, holder_entries, fetch, rejected, tuple(notes))
