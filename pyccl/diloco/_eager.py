"""Eager updates (Kale, Douillard, Donchev, 2025) on a shared, bit-identical global state.

In one-step-delayed DiLoCo the average of outer step k is applied at step
k + 1, so every inner phase starts from global parameters that miss the
newest average: with Nesterov momentum 0.9 that one-step lag diverges. Eager
updates start the inner phase from a *look-ahead*: the outer step the
in-flight average will make, taken now with a stand-in for it, the average
of the other peers' last pseudo-gradients and this peer's fresh one::

    proxy = (sum_{k-1} - mine_{k-1} + mine_k) / (contributors_{k-1} - mine? + 1)

In the paper every worker keeps its own outer parameters, which drift apart
by their local proxies. Here the *global* parameters and the outer
optimizer's state follow only the exact, all-reduced averages (one step
behind), identically on every peer; the look-ahead is a trial outer step on
a copy, and only its result (the local start point) differs between peers.
That keeps the shared state bit-identical (a joiner receives it as in plain
delayed mode, starts from the global parameters with no look-ahead, and
has none to subtract) while giving the inner phase the fresh start the paper
gets. The pseudo-gradient of the next step is measured from the local start
point (``start - local``), so it holds only the inner steps' progress.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._layout import PinnedState, Slot


def trial_step(
    opt: torch.optim.Optimizer,
    pinned: PinnedState,
    fragment: int,
    slots: Sequence[Slot],
    grads: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
) -> None:
    """Write into ``out[i]`` the global parameters of ``slots[i]`` after one
    outer-optimizer step with gradient ``grads[i]`` (flat, like the slot),
    and leave the global parameters and the optimizer's state as they were.

    Works for any optimizer whose state PinnedState holds (all its tensors),
    by saving and restoring the fragment's parameter and state buffers.
    """
    saved_params = [s.glob.flat.clone() for s in slots]
    state_flats = [flat.flat for f, flat in pinned.flats.values() if f == fragment]
    saved_state = [t.clone() for t in state_flats]
    views = [v for s in slots for v in s.glob.views]
    try:
        with torch.no_grad():
            for s, g in zip(slots, grads):
                for v, gv in zip(s.glob.views, s.glob.views_of(g)):
                    v.grad = gv
            try:
                opt.step()
            finally:
                for v in views:
                    v.grad = None
        pinned.repin()
        for s, o in zip(slots, out):
            o.copy_(s.glob.flat)
    finally:
        with torch.no_grad():
            for s, p in zip(slots, saved_params):
                s.glob.flat.copy_(p)
            for t, v in zip(state_flats, saved_state):
                t.copy_(v)
