"""Shared-state sync rounds on the master: who takes part, when a round is
planned and finished, what each participant is sent.

Rounds are independent of epochs and drains: at most one round per group is
open; it includes the members of the moment it opened, loses participants
only by death, and is planned by the pure :func:`pyccl.master.sync.plan_sync`.
A ``sync`` from a member outside the open round (admitted after it opened,
or already answered) waits in ``sync_queue`` and opens the next round when
this one ends. Called by :class:`~pyccl.master.state.MasterState` only.

``held``: the group has lost half of its epoch or more while a standby may
have taken over (:meth:`pyccl.master.epochs.Epochs.quorum_lost`); the round
neither plans nor finishes until the next epoch commits, so a revision is
never committed by a minority that may be one side of a partition.
"""

from __future__ import annotations

import logging

from pyccl import protocol as P
from pyccl.master.model import Action, Group, Peer, Send, SyncRound
from pyccl.master.sync import SyncRequest, plan_sync
from pyccl.protocol import clip_reason
from pyccl.wire import FrameError, clip

log = logging.getLogger("pyccl.master")


def on_sync(peer: Peer, frame: P.Sync, out: list[Action], held: bool = False) -> None:
    """A member's ``sync`` frame: join (or queue for) the group's sync round."""
    revision, strategy, keys = frame.revision, frame.strategy, frame.keys
    group = peer.group
    assert group is not None
    pid = peer.peer_id
    rnd = group.sync
    request = SyncRequest(pid, strategy, revision, keys, peer.data_host, peer.data_port)
    if rnd is not None and pid in rnd.waiting:
        if rnd.plan is not None or pid in rnd.reports:
            raise FrameError(f"'sync' while this peer's sync {rnd.number} has no result yet")
        rnd.reports[pid] = request
    elif pid in group.sync_queue:
        raise FrameError("'sync' while this peer's previous 'sync' has no result yet")
    elif rnd is not None:
        # Not part of the open round (admitted after it opened, or already
        # answered): this report opens or joins the next round.
        group.sync_queue[pid] = (peer, request)
        log.info("group %d: %s waits for the next sync round (sync %d in progress)",
                 group.gid, peer.label(), rnd.number)
        return
    else:
        rnd = open_sync(group)
        rnd.reports[pid] = request
    check_sync(group, out, held)

def on_sync_done(peer: Peer, frame: P.SyncDone, out: list[Action], held: bool = False) -> None:
    """A member finished (or failed) its transfer."""
    number, ok, reason = frame.sync, frame.ok, frame.reason
    group = peer.group
    assert group is not None
    rnd = group.sync
    if rnd is None or rnd.number != number or rnd.plan is None or peer.peer_id not in rnd.waiting:
        raise FrameError(f"'sync_done' for sync {number}, which has no transfer planned for this peer")
    if peer.peer_id in rnd.done:
        raise FrameError(f"duplicate 'sync_done' for sync {number}")
    rnd.done[peer.peer_id] = (ok, reason)
    if not ok:
        log.warning("group %d sync %d: %s failed its transfer: %s",
                    group.gid, number, peer.label(), clip(reason, 300))
    check_sync(group, out, held)

def open_sync(group: Group) -> SyncRound:
    group.syncs += 1
    rnd = group.sync = SyncRound(group.syncs, group.members)
    log.info("group %d opened sync %d with members %s", group.gid, rnd.number, list(rnd.waiting))
    return rnd

def sync_drop(group: Group, peer: Peer, out: list[Action], held: bool = False) -> None:
    """A member died: out of the open round (at any stage) and out of the queue."""
    group.sync_queue.pop(peer.peer_id, None)
    rnd = group.sync
    if rnd is None or rnd.waiting.pop(peer.peer_id, None) is None:
        return
    rnd.reports.pop(peer.peer_id, None)
    rnd.done.pop(peer.peer_id, None)
    log.info("group %d sync %d goes on without peer %d", group.gid, rnd.number, peer.peer_id)
    check_sync(group, out, held)

def check_sync(group: Group, out: list[Action], held: bool = False) -> None:
    """Plan or finish the open round when its last awaited frame is in; then open the next one."""
    while not held:
        rnd = group.sync
        if rnd is None:
            return
        if rnd.plan is None:
            if rnd.waiting and len(rnd.reports) < len(rnd.waiting):
                return
            plan_round(group, rnd, out)
        if rnd.waiting and len(rnd.done) < len(rnd.waiting):
            return
        finish_sync(group, rnd, out)
        group.sync = None
        if not group.sync_queue:
            return
        # Reports that waited for this round to end open the next one,
        # which includes every member of this moment.
        queued, group.sync_queue = group.sync_queue, {}
        nxt = open_sync(group)
        for pid, (_, request) in queued.items():
            nxt.reports[pid] = request

def plan_round(group: Group, rnd: SyncRound, out: list[Action]) -> None:
    plan = rnd.plan = plan_sync(group.revision, [rnd.reports[pid] for pid in rnd.waiting])
    for pid, reason in sorted(plan.rejected.items()):
        peer = rnd.waiting.pop(pid)
        log.warning("group %d sync %d: rejected %s: %s", group.gid, rnd.number, peer.label(), reason)
        out.append(Send(peer.conn_id, P.SyncResult(rnd.number, False, rnd.reports[pid].revision,
                                                   clip_reason(reason))))
    if not rnd.waiting:
        return  # everyone rejected or gone: _finish_sync logs the end
    log.info("group %d sync %d plan: %s", group.gid, rnd.number, plan.describe())
    for note in plan.notes:
        log.warning("group %d sync %d: %s", group.gid, rnd.number, note)
    holders = tuple(P.Member(*e) for e in plan.holder_entries)
    assert plan.revision is not None
    for pid, peer in rnd.waiting.items():
        out.append(Send(peer.conn_id, P.SyncPlan(rnd.number, plan.revision, tuple(plan.fetch[pid]), holders)))

def finish_sync(group: Group, rnd: SyncRound, out: list[Action]) -> None:
    plan = rnd.plan
    assert plan is not None
    if not rnd.waiting:
        log.info("group %d sync %d ended with no participant left (rejected or gone)", group.gid, rnd.number)
        return
    target = plan.revision
    assert target is not None
    good = [pid for pid in rnd.waiting if rnd.done[pid][0]]
    for pid, peer in rnd.waiting.items():
        ok, reason = rnd.done[pid]
        out.append(Send(peer.conn_id, P.SyncResult(rnd.number, ok, target, reason)))
    if good:
        group.revision = target
    failed = [pid for pid in rnd.waiting if pid not in good]
    level = logging.WARNING if failed else logging.INFO
    log.log(level, "group %d sync %d finished: revision %s, ok %s, failed %s",
            group.gid, rnd.number, group.revision, good, failed)
    rnd.waiting.clear()
