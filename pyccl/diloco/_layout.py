"""Flat buffers, fragments and the outer optimizer's shared state (no I/O here).

Everything in this module is a pure function of the model's parameter list
(names, shapes, dtypes, order), so every peer builds exactly the same layout:
the same fragments, the same flat buffers in the same order, the same
SharedState keys. That is what lets peers reduce and sync them blindly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def partition(sizes: Sequence[int], fragments: int) -> list[list[int]]:
    """Split parameters (given by element counts, in model order) into
    ``fragments`` contiguous, non-empty groups of about equal size.

    Greedy and integer-only, so it is identical on every machine: a
    parameter goes to fragment f while the running total up to its middle
    stays within (f + 1) / F of the whole.
    """
    n = len(sizes)
    if not 1 <= fragments <= n:
        raise ValueError(f"fragments must be between 1 and the number of parameters ({n}), got {fragments}")
    total = sum(sizes)
    groups: list[list[int]] = []
    start = acc = 0
    for f in range(fragments - 1):
        end = start
        last_allowed = n - (fragments - f - 1)  # leave one parameter for each later fragment
        while end < last_allowed and (end == start or (2 * acc + sizes[end]) * fragments <= 2 * total * (f + 1)):
            acc += sizes[end]
            end += 1
        groups.append(list(range(start, end)))
        start = end
    groups.append(list(range(start, n)))
    return groups


def sync_offsets(sync_every: int, fragments: int) -> list[int]:
    """Inner-step offset (mod sync_every) at which each fragment is synced."""
    return [f * sync_every // fragments for f in range(fragments)]


class Flat:
    """One contiguous buffer with a view of the right shape for each tensor it holds."""

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype) -> None:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.flat = torch.zeros(sum(sizes), dtype=dtype)
        self.views = [v.view(s) for v, s in zip(torch.split(self.flat, sizes), shapes)] if sizes else []
        self.sizes = sizes

    def views_of(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Views of another flat tensor ``t`` (same length) with this layout."""
        return [v.view(x.shape) for v, x in zip(torch.split(t, self.sizes), self.views)]


@dataclass
class Slot:
    """The parameters of one fragment that share one dtype: reduced as one buffer."""

    index: int                     # position among all slots (sets the all-reduce tag)
    fragment: int
    dtype: torch.dtype
    names: list[str]
    local: list[torch.Tensor]      # the model's own parameters
    glob: Flat                     # the global (outer) parameters
    pg: torch.Tensor               # pseudo-gradient, global - local; the all-reduce input
    out: torch.Tensor | None = None            # overlapped modes: the all-reduce output (a sum)
    grads: list[torch.Tensor] = field(default_factory=list)  # .grad views handed to the outer optimizer
    start: torch.Tensor | None = None          # eager mode: this peer's local start point (flat)
    proxy: torch.Tensor | None = None          # eager mode: the stand-in for the in-flight average
    anchor: torch.Tensor | None = None         # rebase: the local parameters at the fragment's last sync
    ef: Any = None                             # quantize: the ErrorFeedback of a float32 slot

    @property
    def numel(self) -> int:
        return int(self.glob.flat.numel())


def build_slots(named: Sequence[tuple[str, torch.Tensor]], fragments: int, overlapped: bool,
                eager: bool = False, rebase: bool = False) -> list[list[Slot]]:
    """Slots per fragment; inside a fragment one slot per dtype, in order of first appearance.

    ``overlapped`` (delayed or streaming with a sync delay): the all-reduce
    runs out of place into ``out``, which the outer optimizer then reads;
    ``eager`` adds the local start point and the proxy buffers, ``rebase``
    the start point and the anchor."""
    groups = partition([int(p.numel()) for _, p in named], fragments)
    out: list[list[Slot]] = []
    index = 0
    for f, idxs in enumerate(groups):
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in idxs:
            by_dtype.setdefault(named[i][1].dtype, []).append(i)
        slots = []
        for dt, members in by_dtype.items():
            params = [named[i][1] for i in members]
            glob = Flat([p.shape for p in params], dt)
            with torch.no_grad():
                for v, p in zip(glob.views, params):
                    v.copy_(p)
            pg = torch.zeros_like(glob.flat)
            slot = Slot(index, f, dt, [named[i][0] for i in members], params, glob, pg)
            if overlapped:
                slot.out = torch.zeros_like(glob.flat)
                slot.grads = glob.views_of(slot.out)
            else:
                slot.grads = glob.views_of(pg)
            if eager or rebase:
                slot.start = glob.flat.clone()
            if eager:
                slot.proxy = torch.zeros_like(glob.flat)
            if rebase:
                slot.anchor = glob.flat.clone()
            slots.append(slot)
            index += 1
        out.append(slots)
    return out


# ------------------------------------------------------ outer optimizer state


def default_outer_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """SGD with lr 0.7, momentum 0.9, Nesterov: the outer optimizer of the DiLoCo paper."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def initialize_state(opt: torch.optim.Optimizer) -> None:
    """Create the optimizer state torch would create lazily on the first step.

    Shared state needs every tensor to exist before the first step (a joiner
    must see the same keys as everyone else). The values are exactly the
    ones torch's first step starts from, so the first update is unchanged:
    SGD's momentum buffer starts at zero (``0 * momentum + g == g``, the same
    bytes as torch's ``clone(g)``), Adam/AdamW at step 0 with zero moments.
    Other optimizers must arrive with their state already created.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            if isinstance(opt, torch.optim.SGD):
                if group.get("momentum", 0) != 0:
                    st["momentum_buffer"] = torch.zeros_like(p)
            elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                # torch's own default for the step counter (float32 unless the default dtype is float64)
                st["step"] = torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                         else torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
            else:
                raise ValueError(
                    f"the outer optimizer {type(opt).__name__} has no state for a parameter yet; pyccl creates the "
                    "initial state of SGD, Adam and AdamW itself, for another optimizer create every parameter's "
                    "state tensors in the outer_optimizer factory (the state must exist before the first step so "
                    "that joiners can receive it)"
                )


class PinnedState:
    """The outer optimizer's state tensors, moved into flat buffers per
    (fragment, state key, dtype) so that a SharedState holds few large keys.

    The optimizer keeps working on views of those buffers (torch's
    optimizers update their state in place). ``repin()`` after each step
    copies back any state tensor the optimizer replaced instead.
    """

    def __init__(self, opt: torch.optim.Optimizer, fragment_of: dict[int, int]) -> None:
        self.opt = opt
        groups: dict[tuple[int, str, torch.dtype], list[tuple[torch.Tensor, str, torch.Tensor]]] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                f = fragment_of[id(p)]
                for key, v in opt.state[p].items():
                    if not torch.is_tensor(v):
                        raise ValueError(
                            f"outer optimizer state {key!r} is a {type(v).__name__}; only tensor state can be "
                            "shared bit-exactly"
                        )
                    groups.setdefault((f, key, v.dtype), []).append((p, key, v))
        self.flats: dict[str, tuple[int, Flat]] = {}
        self._entries: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        for (f, key, dt), entries in groups.items():
            flat = Flat([v.shape for _, _, v in entries], dt)
            with torch.no_grad():
                for view, (p, k, v) in zip(flat.views, entries):
                    view.copy_(v)
                    opt.state[p][k] = view
                    self._entries.append((p, k, view))
            self.flats[f"f{f}.opt.{key}.{dtype_name(dt)}"] = (f, flat)
        self._count = sum(len(opt.state[p]) for g in opt.param_groups for p in g["params"])

    def repin(self) -> None:
        with torch.no_grad():
            for p, key, view in self._entries:
                cur = self.opt.state[p].get(key)
                if cur is not view:
                    if cur is None or not torch.is_tensor(cur) or cur.shape != view.shape:
                        raise RuntimeError(f"the outer optimizer dropped or reshaped its state {key!r}")
                    view.copy_(cur)
                    self.opt.state[p][key] = view
        count = sum(len(self.opt.state[p]) for g in self.opt.param_groups for p in g["params"])
        if count != self._count:
            raise RuntimeError("the outer optimizer created new state after the first step; it cannot be shared")


def make_outer_optimizer(
    factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None, params: list[torch.Tensor]
) -> torch.optim.Optimizer:
    opt = (factory or default_outer_optimizer)(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"outer_optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    if ids != {id(p) for p in params}:
        raise ValueError("the outer optimizer must optimize exactly the parameter copies it was given")
    return opt

