"""Checks for lesson 00 (setup and map): the warm-up exercise on model-size arithmetic."""

from __future__ import annotations

from collections.abc import Callable

from utils.checks import CheckFailed, CheckResult, expect, expect_close, is_finite_number, run_check


def bytes_for(num_params: int, bits: float) -> float:
    """Bytes needed to store ``num_params`` weights at ``bits`` bits each (lesson 00).

    ``num_params * bits / 8``: 8 bits per byte, no rounding (a 4-bit weight is half a byte).
    Real files add a little: a header, and for group-wise quantization one scale per group
    (lesson 05).
    """
    if num_params < 0 or bits <= 0:
        raise ValueError(f"need num_params >= 0 and bits > 0, got {num_params} and {bits}")
    return num_params * bits / 8


def _diagnose(got: float, num_params: int, bits: float) -> str | None:
    """A hint for the classic wrong answers at ``(num_params, bits)``."""
    expected = num_params * bits / 8
    guesses = {
        num_params * bits: "that is the number of bits, not bytes: divide by 8 bits per byte",
        num_params * 8 / bits: "the fraction is upside down: bytes = params * bits / 8",
        num_params * 2: "you always used 2 bytes per weight: use the `bits` argument",
        num_params * 4: "you always used 4 bytes per weight: use the `bits` argument",
        expected / 1e6: "that looks like megabytes: return bytes (convert afterwards)",
        expected / 2**20: "that looks like MiB: return bytes (convert afterwards)",
        expected / 1e9: "that looks like gigabytes: return bytes (convert afterwards)",
        expected / 2**30: "that looks like GiB: return bytes (convert afterwards)",
    }
    for value, hint in guesses.items():
        if value != expected and abs(got - value) <= 1e-9 * max(1.0, abs(value)):
            return hint
    return None


def check_bytes_for(fn: Callable[[int, float], float]) -> CheckResult:
    """Exercise 0.1: ``bytes_for(num_params, bits)`` -> bytes."""

    def cases(fn: Callable[[int, float], float]) -> None:
        for num_params, bits in [(10**9, 16), (1000, 32), (10**9, 8), (10**9, 4), (7, 4),
                                 (0, 16), (1, 8), (3, 2)]:
            got = fn(num_params, bits)
            expect(is_finite_number(got),
                   f"bytes_for({num_params}, {bits}) should return a number, got {got!r}")
            got = float(got)
            expected = num_params * bits / 8
            hint = _diagnose(got, num_params, bits)
            if hint is not None:
                raise CheckFailed(f"bytes_for({num_params:,}, {bits}) gave {got:,.6g}: {hint}.")
            if bits < 8 and got != expected and got == (num_params * bits) // 8:
                raise CheckFailed(f"bytes_for({num_params}, {bits}) gave {got:g}, expected "
                                  f"{expected:g}: do not round down, a {bits}-bit weight is "
                                  f"{bits / 8:g} of a byte (use / not //).")
            if bits < 8 and got == 0 and expected > 0:
                raise CheckFailed(f"bytes_for({num_params:,}, {bits}) gave 0: `bits // 8` is 0 "
                                  "for fewer than 8 bits; use `bits / 8`.")
            expect_close(got, expected, f"bytes_for({num_params:,}, {bits})", atol=1e-9,
                         rtol=1e-12)

    return run_check("0.1", "bytes_for", fn, cases,
                     success="all checks passed: bytes = parameters x bits / 8.")
