"""DiLoCo, delayed DiLoCo (one-step, eager, overlapped), streaming DiLoCo and
quantized DiLoCo with error feedback, on a pyccl Communicator.

    import pyccl, pyccl.diloco
    comm = pyccl.Communicator(master_address); comm.connect(timeout=600)
    model = ...; inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dl = pyccl.diloco.DiLoCo(model, inner, comm, sync_every=50)   # delayed=, fragments=, sync_delay=, quantize=
    for batch in data:
        loss = model(batch).loss
        loss.backward()
        dl.step()          # inner step; every H inner steps also the outer step
    dl.finish()            # all peers, same inner step: the model now holds the final global parameters

Algorithm (Douillard et al., 2023). Every peer trains its own copy of the
model (the *local* parameters) with the inner optimizer. Every H inner
steps it does an *outer step*: the pseudo-gradient ``global - local`` is
averaged over the peers with one all-reduce per dtype (the parameters are
flattened into one contiguous buffer per dtype, so a model costs a few large
ops, not one per tensor), the outer optimizer (default SGD, lr 0.7, momentum
0.9, Nesterov) applies it to the *global* parameters, and the local
parameters are reset to the new global ones. The inner optimizer's state
stays local.

Shared state. The global parameters, the outer optimizer's state (created
up front with the values torch would start from, then kept in flat buffers
the optimizer updates in place) and the counters (inner steps, outer steps)
live in one ``pyccl.SharedState``; its revision counts outer steps (with
fragments: rounds of H inner steps). Every peer gets the all-reduce's
bit-identical result and applies the same float32 update on the CPU, so
every peer ends every outer step with the same bytes; the sync verifies it
by hash (and would repair a peer that differed).

One outer step, sync mode (``delayed=False``)::

    pg = global - local                       (per dtype, flat)
    all_reduce(pg, op="avg")                  PeerFailure: the input is intact and the
                                              world size already the new one: redo it
    outer_optimizer.step() with grad = pg     -> new global parameters
    revision += 1
    update_topology()                         admit joiners: only here, between outer steps
    sync_shared_state(state)                  a joiner receives global params, momentum, counters
    local <- global

A joiner builds its DiLoCo like everyone else: the constructor calls
``update_topology()`` (for a joiner that call is the round that admitted
it, so it returns at once) and ``sync_shared_state()`` together with the
members' calls at the end of their outer step, takes the counters (so its
inner-step count, and hence its fragment schedule, is the group's) and
loads the global parameters into its model: its first inner step starts
from the group's exact state. A peer alone (world size 1) keeps training:
its all-reduce is local and its own pseudo-gradient is the average.

Delayed mode (``delayed=True``, one-step-delayed DiLoCo). The all-reduce
of outer step k is started with ``all_reduce_async`` and runs while the
next H inner steps compute; outer step k + 1 waits for it and applies it::

    pg_k+1 = start point - local              (the start point is the current global)
    wait for the all-reduce of pg_k           PeerFailure: redo it now over the survivors
    outer_optimizer.step() with grad = sum_k / contributors_k
    revision += 1; update_topology(); sync_shared_state(state)
    all_reduce_async(pg_k+1, op="sum") and all_reduce_async(1 or 0, op="sum")  (contributors)
    local <- global

So the update applied at step k + 1 is the average of pseudo-gradients
measured from the parameters of step k - 1: one step stale, which is the
price of hiding the communication. update_topology() and sync_shared_state()
run after the wait, when nothing is in flight (the Communicator requires
that), and before the next all-reduce starts.

A joiner admitted at outer step k + 1 cannot contribute to the all-reduce
of step k + 1, which the members start right after the sync: it computed
no pseudo-gradient. It still takes part in that op (collectives include
every member), with a zero buffer and a contributor count of 0; the sums are
divided by the all-reduced count of contributors, not by the world size, so
the joiner does not dilute the average. It trains from the global
parameters it received and contributes from outer step k + 2 on.

Failures in delayed mode: a peer that dies while the background all-reduce
runs makes it fail on the survivors; they find out when they wait for it at
the next outer step and redo it, synchronously, over the survivors (the
inputs are intact: the op runs out of place). The dead peer's
pseudo-gradient is lost, like in sync mode. The sum and the count are
checked to have run over the same peers; otherwise both are redone.

Streaming DiLoCo (``fragments=F``). The parameters are split into F
fragments, contiguous in model order and of about equal size (an
integer-only greedy split, identical on every peer); fragment f does its
outer step at the inner steps where ``step % H == f * H // F``, so each
fragment is still synced every H inner steps but the peak all-reduce is
1/F of the model. Joiners are admitted and the state synced at fragment 0's
outer step. With ``delayed=True`` too, each fragment's all-reduce runs in
the background until that fragment's next outer step, except that at
fragment 0's outer step (where update_topology and the sync need an idle
Communicator) the other fragments' all-reduces are waited for early: each
is then hidden behind at least H/F inner steps, not H. Their finished sums
are part of the shared state (``pending``), so a joiner applies them at
their fragment's next outer step exactly as the members do.

Eager and look-ahead (``delayed="eager"``, ``delayed="lookahead"``). The
delayed schedule above, and the same shared state; in addition each inner
phase starts from a local look-ahead: after the launch, a trial outer step
(on copies of the fragment's global parameters and optimizer state) with a
stand-in for the average in flight, the other peers' last pseudo-gradients
with this peer's fresh one (eager updates, Kale et al., 2025) or this
peer's fresh one alone (look-ahead). The next pseudo-gradient is measured
from that start point. Only the start points differ between peers, so the
shared state stays bit-identical and a joiner (no look-ahead: it starts
from the global parameters) needs nothing more. See ``_eager.py``.

Streaming with a sync delay (``sync_delay=tau``, ``mixing=alpha``;
``delayed="overlap"`` is ``sync_delay=H//max(2, F), mixing="rebase"``). Streaming
DiLoCo's overlap (Douillard et al., 2025): at fragment f's sync step its
pseudo-gradient ``start - local`` (start: the global parameters, or the
rebase start point) is all-reduced in the background while the local
parameters keep training; tau inner steps later the average *lands*: the
outer optimizer steps the global parameters, and the fragment's local
parameters become ``alpha * local + (1 - alpha) * global``, or with
``mixing="rebase"`` ``global + (local - anchor)`` (anchor: the local
parameters at the sync; start becomes the new global parameters), which
keeps the progress made since the sync without sending it twice::

    step % H == f*H//F:          pg = start - local; anchor <- local; error feedback; all_reduce_async(pg), count
                                 (f == 0: settle the others, revision += 1, update_topology, sync)
    step % H == (f*H//F+tau)%H:  wait (redo over the survivors on failure); outer step with sum / contributors;
                                 local <- alpha local + (1-alpha) global   or   global + (local - anchor)

Sums still in flight at fragment 0's sync are settled there and shared
(``pending``), so a joiner applies them when they land, as the members do.
It combines with ``fragments`` but not with ``delayed=True``, which is the
tau = H case (the average lands at the fragment's next sync and the local
parameters are reset, not mixed): passing both is a ValueError. With
``delayed="overlap"`` each fragment's all-reduce hides behind the inner
steps until the next fragment's sync (H/2 with one fragment) and the outer
optimizer keeps Nesterov momentum; with ``fragments=4`` it stayed within
2% of sync DiLoCo in the example (docs/diloco_compare_600.md). Anchor and start are local; a
joiner sets both to the global parameters it received.

Quantization (``quantize="uint8"`` or ``"int4"``), float32 pseudo-gradients
only (never other dtypes or the contributor counts). ``"uint8"`` uses the
core's quantized all-reduce, whose result is bit-identical on every peer.
``"int4"`` packs 4-bit codes (min/max per block of 512) here, all-gathers
them and sums every rank's decoded values in rank order on every peer:
bit-identical too. Error feedback (``error_feedback=True``, the default):
each peer adds the residual its quantization lost to its next
pseudo-gradient; the residual is local, a joiner starts with zero, and a
redo resends the same bytes. See ``_compress.py``.

Tags: DiLoCo uses all-reduce tags from ``TAG_BASE`` (0x5D1C0000) up.
"""

from __future__ import annotations

from ._diloco import TAG_BASE, DiLoCo
from ._info import OuterStepInfo
from ._layout import default_outer_optimizer, partition, sync_offsets
from ._layout import initialize_state as initialize_optimizer_state

__all__ = ["DiLoCo", "OuterStepInfo", "TAG_BASE", "default_outer_optimizer", "initialize_optimizer_state",
           "partition", "sync_offsets"]
