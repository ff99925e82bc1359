"""DiLoCo's options, checked and resolved into one mode (see ``DiLoCo``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._compress import QUANTIZE_OPTIONS


@dataclass(frozen=True)
class Options:
    """The resolved schedule: ``mode`` is "sync", "naive" (one-step delayed),
    "eager" (eager or look-ahead delayed) or "stream" (a sync delay)."""

    mode: str
    sync_delay: int
    mixing: float        # alpha (0.0 with rebase)
    rebase: bool
    own_proxy: bool      # the look-ahead stands in with this peer's pseudo-gradient alone


def resolve_options(delayed: bool | str, sync_every: int, fragments: int, sync_delay: int,
                    mixing: float | str | None, quantize: str | None) -> Options:
    """Check the options (ValueError naming the bad one) and resolve the mode."""
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive integer, got {sync_every!r}")
    if not isinstance(fragments, int) or not 1 <= fragments <= sync_every:
        raise ValueError(f"fragments must be an integer between 1 and sync_every ({sync_every}), got {fragments!r}")
    if delayed in (False, None):
        mode = "sync"
    elif delayed is True or delayed == "naive":
        mode = "naive"
    elif delayed in ("eager", "lookahead"):
        mode = "eager"
    elif delayed == "overlap":
        if sync_every < 2:
            raise ValueError("delayed='overlap' needs sync_every >= 2")
        mode = "sync"
        sync_delay = sync_delay or max(1, sync_every // max(2, fragments))
        mixing = "rebase" if mixing is None else mixing
    else:
        raise ValueError(f"delayed must be False, True, 'naive', 'eager', 'lookahead' or 'overlap', "
                         f"got {delayed!r}")
    if not isinstance(sync_delay, int) or not 0 <= sync_delay < sync_every:
        raise ValueError(f"sync_delay must be an integer in [0, sync_every), got {sync_delay!r}")
    if sync_delay and mode != "sync":
        raise ValueError("sync_delay is streaming DiLoCo's overlap of tau < H inner steps; delayed=True is the "
                         "tau = H case (applied at the fragment's next sync): pass one or the other")
    if mixing is None:
        mixing = 0.5
    if mixing != "rebase" and not (isinstance(mixing, (int, float)) and 0.0 <= float(mixing) <= 1.0):
        raise ValueError(f"mixing must be in [0, 1] or 'rebase', got {mixing!r}")
    if sync_delay:
        mode = "stream"
    if quantize is not None and quantize not in QUANTIZE_OPTIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_OPTIONS}, got {quantize!r}")
    rebase = mixing == "rebase" and mode == "stream"
    return Options(mode, sync_delay, 0.0 if mixing == "rebase" else float(mixing), rebase, delayed == "lookahead")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's trainable parameters, checked: CPU, floating point, at least one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    for n, p in named:
        if p.device.type != "cpu":
            raise ValueError(f"parameter {n!r} is on {p.device}; DiLoCo works on CPU parameters")
        if not p.is_floating_point():
            raise ValueError(f"parameter {n!r} has dtype {p.dtype}; DiLoCo needs floating-point parameters")
    return named
