"""Block quantization of float32 pseudo-gradients, with error feedback.

Two wire formats for the float32 slots of an outer all-reduce:

* ``"uint8"``: the core's quantized ring all-reduce (uint8 codes with a
  min/max per chunk; every peer gets the same bytes). The requantization of
  partial sums inside the ring cannot be attributed to one peer, so the
  residual kept here is the error of quantizing this peer's own input with
  the same scheme (256 levels, min/max per block of :data:`UINT8_BLOCK`
  elements): an estimate of its share of the compression error.
* ``"int4"``: done here, exactly. Each peer encodes its input as 4-bit codes
  (16 levels, min/max per block of :data:`INT4_BLOCK` elements, two codes a
  byte, the block's min and scale as float32 after the codes), the packed
  bytes are all-gathered, and every peer decodes every rank's bytes and adds
  them in rank order: the same bytes through the same float32 operations,
  so the sum is bit-identical on every peer. The residual is the exact error
  of what this peer sent.

Error feedback (Seide et al., 2014; Karimireddy et al., 2019): before it is
sent, ``x = pseudo_gradient + residual``; after, ``residual = x - decode(x)``.
What was lost to quantization is added to the next outer step's input, so
errors do not accumulate into a bias. The residual is local (never shared):
a peer that joins starts with a zero residual, and a peer that dies takes
its residual with it.

Decoding is plain IEEE float32 (one multiply, one add per element, separate
torch ops, no fused multiply-add), so every machine decodes the same bytes
to the same bits.
"""

from __future__ import annotations

import torch

#: Elements per min/max block of the 4-bit format (8 bytes of header per block: ~3% of the codes).
INT4_BLOCK = 512
#: Elements per block of the local uint8 estimate used for the residual of ``"uint8"``.
UINT8_BLOCK = 4096

QUANTIZE_OPTIONS = ("uint8", "int4")


class BlockQuantizer:
    """Min/max quantization to ``2**bits`` levels per block of ``block`` elements.

    A block decodes as ``min + code * scale`` with ``scale = (max - min) /
    (2**bits - 1)``; a constant block (scale 0) decodes exactly. Inputs must
    be finite (``ValueError`` otherwise: training diverged).
    """

    def __init__(self, bits: int, block: int) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.block = block
        self.levels = (1 << bits) - 1

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        n = int(x.numel())
        nb = max(1, -(-n // self.block))
        pad = nb * self.block - n
        flat = x.reshape(-1)
        if pad:
            # Pad with the last value (or 0): it neither widens a block's range nor adds a code that matters.
            fill = flat[-1:].expand(pad) if n else torch.zeros(pad, dtype=x.dtype)
            flat = torch.cat([flat, fill])
        return flat.view(nb, self.block), n

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes as uint8 [blocks, block], per-block min, per-block scale) of ``x`` (float32)."""
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the pseudo-gradient holds NaN or Inf, which cannot be quantized (training diverged)")
        b, _ = self._blocks(x)
        lo = b.amin(dim=1)
        hi = b.amax(dim=1)
        scale = (hi - lo) / float(self.levels)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((b - lo[:, None]) / safe[:, None]).clamp_(0, self.levels).to(torch.uint8)
        return q, lo, scale

    def decode_codes(self, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, n: int,
                     out: torch.Tensor) -> None:
        """``out[:n] = lo + q * scale`` per block (float32)."""
        vals = q.to(torch.float32) * scale[:, None]
        vals += lo[:, None]
        out.copy_(vals.reshape(-1)[:n].view(out.shape))

    def roundtrip(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out = decode(encode(x))``: what the receivers would see of ``x``."""
        q, lo, scale = self.codes(x)
        self.decode_codes(q, lo, scale, int(x.numel()), out)


class Int4Packer:
    """The 4-bit wire format of one slot: ``[codes, two a byte][min, scale per block as float32]``."""

    def __init__(self, numel: int, block: int = INT4_BLOCK) -> None:
        self.q = BlockQuantizer(4, block)
        self.numel = numel
        self.blocks = max(1, -(-numel // block))
        self.code_bytes = self.blocks * block // 2
        self.nbytes = self.code_bytes + 8 * self.blocks

    def encode(self, x: torch.Tensor, out: torch.Tensor, decoded: torch.Tensor) -> None:
        """Pack ``x`` into ``out`` (uint8, ``nbytes``) and write what it decodes to into ``decoded``."""
        q, lo, scale = self.q.codes(x)
        flat = q.reshape(-1)
        out[: self.code_bytes] = flat[0::2] | (flat[1::2] << 4)
        meta = torch.stack([lo, scale], dim=1).reshape(-1)
        out[self.code_bytes:] = meta.view(torch.uint8)
        self.q.decode_codes(q, lo, scale, self.numel, decoded)

    def decode(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = the float32 values packed in ``packed`` (one rank's bytes)."""
        codes = packed[: self.code_bytes]
        q = torch.empty(self.code_bytes * 2, dtype=torch.uint8)
        q[0::2] = codes & 0x0F
        q[1::2] = codes >> 4
        meta = packed[self.code_bytes:].clone().view(torch.float32).view(self.blocks, 2)
        self.q.decode_codes(q.view(self.blocks, self.q.block), meta[:, 0].contiguous(), meta[:, 1].contiguous(),
                            self.numel, out)

    def sum_gathered(self, gathered: torch.Tensor, out: torch.Tensor) -> int:
        """``out`` = the sum, in rank order, of every rank's decoded values in
        ``gathered`` (world_size x nbytes, as an all-gather leaves it).
        Returns the number of ranks."""
        ranks = int(gathered.numel()) // self.nbytes
        tmp = torch.empty_like(out)
        for r in range(ranks):
            part = gathered[r * self.nbytes:(r + 1) * self.nbytes]
            if r == 0:
                self.decode(part, out)
            else:
                self.decode(part, tmp)
                out.add_(tmp)
        return ranks


class ErrorFeedback:
    """The local residual of one float32 slot and the compression step that updates it.

    ``prepare(x)`` turns the pseudo-gradient ``x`` (in place) into what is
    sent, ``x + residual``, and sets ``residual = x_sent - decode(x_sent)``;
    for ``"int4"`` it also packs ``x_sent`` into ``packed``. So at every
    step ``decode(sent) + residual_new == pseudo_gradient + residual_old``
    up to float32 rounding of one subtraction: nothing is lost, only delayed.
    """

    def __init__(self, quantize: str, numel: int, feedback: bool = True) -> None:
        if quantize not in QUANTIZE_OPTIONS:
            raise ValueError(f"quantize must be one of {QUANTIZE_OPTIONS} or None, got {quantize!r}")
        self.quantize = quantize
        self.feedback = feedback
        self.residual = torch.zeros(numel, dtype=torch.float32)
        self._decoded = torch.zeros(numel, dtype=torch.float32)
        self.packer: Int4Packer | None = Int4Packer(numel) if quantize == "int4" else None
        self.packed: torch.Tensor | None = (
            torch.zeros(self.packer.nbytes, dtype=torch.uint8) if self.packer is not None else None
        )
        self._u8 = BlockQuantizer(8, UINT8_BLOCK)

    def prepare(self, x: torch.Tensor) -> None:
        """Add the residual to ``x`` (in place), pack it (int4) and update the residual."""
        if self.feedback:
            x.add_(self.residual)
        if self.packer is not None:
            assert self.packed is not None
            self.packer.encode(x, self.packed, self._decoded)
        else:
            self._u8.roundtrip(x, self._decoded)
        if self.feedback:
            torch.sub(x, self._decoded, out=self.residual)

    def contribute_nothing(self, x: torch.Tensor) -> None:
        """A peer with no pseudo-gradient (a joiner): send zeros, keep the residual."""
        x.zero_()
        if self.packer is not None:
            assert self.packed is not None
            self.packer.encode(x, self.packed, self._decoded)
