"""Checking servers against each other: pure comparisons and the verdict of a three-way vote.

`verify=FRACTION` (ClientConfig) makes a session run that fraction of its steps, and always the first step
of every server it opens, on a second server that holds the same blocks (same dtype and quantization), and
compare the two outputs. Two honest servers given the same inputs differ only by float rounding (different
batch shapes pick different kernels: measured relative L2 error around 1e-6 in float32), so a distance
above `verify_tolerance` means one of them is wrong. A third server then decides: the one the other two
agree against is the offender. If no third server exists, or all three disagree, the client refuses the
step (VerificationError) rather than return a result nobody vouches for.

What it guarantees: a verified step's output is the majority's. What it does not: an unverified step
(fraction < 1) is trusted as is, so a server that corrupts rarely is caught with probability FRACTION
per corrupted step; tampering smaller than the tolerance is not detected; and three colluding servers that
agree on a wrong answer win the vote.
"""

from __future__ import annotations

import torch

from swarmllm.protocol import ServerRecord


class VerificationError(RuntimeError):
    """Servers disagree about a step and no majority vouches for one answer."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor, in float64 (inf if shapes differ or out is not finite)."""
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


def agree(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return relative_error(a, b) <= tolerance


def odd_one_out(primary: torch.Tensor, second: torch.Tensor, third: torch.Tensor, tolerance: float) -> str | None:
    """Which of 'primary' and 'second' the third server's output contradicts, given that they disagree:
    'primary' if the third agrees with the second, 'second' if it agrees with the primary, None if it
    agrees with neither (or, impossibly for honest rounding, with both)."""
    with_primary, with_second = agree(third, primary, tolerance), agree(third, second, tolerance)
    if with_second and not with_primary:
        return "primary"
    if with_primary and not with_second:
        return "second"
    return None


def verdict(primary: torch.Tensor, second: torch.Tensor, third: torch.Tensor | None, tolerance: float,
            what: str) -> str:
    """Which of two disagreeing answers about `what` is wrong ('primary' or 'second'), by a third server's
    answer (None: no third server could give one). Raises VerificationError when nobody settles it: the
    caller must not return either answer then. Sessions and stateless calls both decide here."""
    if third is None:
        raise VerificationError(f"two servers disagree on {what} and no third holds them to settle it; refusing to "
                                "return an unverified result")
    odd = odd_one_out(primary, second, third, tolerance)
    if odd is None:
        raise VerificationError(f"servers disagree on {what} and no majority vouches for either answer; refusing "
                                "to return an unverified result")
    return odd


def comparable(a: ServerRecord, b: ServerRecord) -> bool:
    """Servers whose outputs should match within float rounding: same dtype, quantization and block versions."""
    return (a.dtype, a.quant, a.override) == (b.dtype, b.quant, b.override)
