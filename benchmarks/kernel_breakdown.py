"""Where the device time of a profiled rollout goes, by kind of kernel: matrix multiplies, attention, the fused
Triton kernels (norms, modulation, GELU...), the VAE's convolutions, the rest.

    python benchmarks/kernel_breakdown.py benchmarks/results/H200_2026-12-03_step_qwenimage_profile_profile_default.txt

reads a table that ``step_bench.py --profile`` wrote (torch.profiler's ``key_averages().table()``) and prints the
breakdown as Markdown. ``step_bench.py --profile`` also stores it with its results, computed from the events.
Only kernel rows count (rows without host time: the ops that launch kernels report the same device time again);
kernels below the table's last row are reported together as "below the table".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["KERNEL_KINDS", "breakdown", "kernel_kind", "markdown", "parse_table"]

# (kind, pattern on the kernel name), first match wins: the VAE's convolutions run as implicit GEMMs and the Triton
# kernels inductor fuses around attention carry its name, so those come before the broad patterns.
KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    ("convolution (VAE)", r"fprop_implicit_gemm|conv"),
    ("norm + modulation (Triton)", r"^triton_.*(rsqrt|layer_norm|mean)"),
    ("GELU (Triton)", r"^triton_.*gelu"),
    ("other fused elementwise (Triton)", r"^triton_"),
    ("attention", r"sdpa|flash|fmha|attention"),
    ("matrix multiply", r"nvjet|gemm|cutlass|sm\d+_xmma"),
)
OTHER = "other kernels"
BELOW = "below the table"

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}
_TIME = re.compile(r"^([0-9.]+)(us|ms|s)$")


def kernel_kind(name: str) -> str:
    """The :data:`KERNEL_KINDS` entry a kernel name belongs to, or ``"other kernels"``."""
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name):
            return kind
    return OTHER


def breakdown(kernels: list[tuple[str, float]], total_us: float | None = None) -> list[dict]:
    """Device time by kind. ``kernels``: (name, self device time in us) per kernel row; ``total_us``: the whole
    device time when ``kernels`` is only the top of a table (the remainder becomes a "below the table" row).
    Returns rows ``{"kind", "ms", "share", "kernels"}``, largest first, shares of the total."""
    by_kind: dict[str, list[float]] = {}
    for name, us in kernels:
        by_kind.setdefault(kernel_kind(name), []).append(us)
    listed = sum(us for _, us in kernels)
    total = listed if total_us is None else total_us
    if total_us is not None and total_us < listed * (1 - 1e-6):
        raise ValueError(f"total_us {total_us} is below the listed kernels' {listed} us")
    rows = [{"kind": kind, "ms": sum(v) / 1e3, "share": sum(v) / total if total else 0.0, "kernels": len(v)}
            for kind, v in by_kind.items()]
    rows.sort(key=lambda r: r["ms"], reverse=True)
    if total_us is not None and total - listed > 0:
        rows.append({"kind": BELOW, "ms": (total - listed) / 1e3, "share": (total - listed) / total, "kernels": None})
    return rows


def _us(text: str) -> float:
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"not a profiler time: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_table(text: str) -> tuple[list[tuple[str, float]], float]:
    """Kernel rows ``(name, self device us)`` and the device total of a ``key_averages().table()`` text with
    device columns (Self CPU, ..., Self CUDA, ...): a kernel row is one without host time."""
    header = next((line for line in text.splitlines() if "Self CPU %" in line), None)
    if header is None or "Self CUDA" not in header:
        raise ValueError("not a torch.profiler table with device columns (no 'Self CPU %' / 'Self CUDA' header)")
    columns = re.split(r"\s{2,}", header.strip())
    self_cpu, cpu_total, self_dev = (columns.index(c) for c in ("Self CPU", "CPU total", "Self CUDA"))
    kernels = []
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(columns) or line is header or not _TIME.match(cells[self_dev]):
            continue
        if _us(cells[self_cpu]) == 0 and _us(cells[cpu_total]) == 0:
            kernels.append((cells[0], _us(cells[self_dev])))
    total = re.search(r"Self CUDA time total:\s*([0-9.]+(?:us|ms|s))", text)
    if total is None:
        raise ValueError("the table has no 'Self CUDA time total' line")
    return kernels, _us(total.group(1))


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel kind | device ms | share of device time | kernel names |", "|---|---|---|---|"]
    for r in rows:
        names = "-" if r["kernels"] is None else r["kernels"]
        lines.append(f"| {r['kind']} | {r['ms']:.1f} | {r['share']:.1%} | {names} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path, help="a profile table written by step_bench.py --profile")
    args = parser.parse_args()
    kernels, total = parse_table(args.table.read_text())
    print(f"{args.table.name}: {total / 1e6:.3f} s of device time, {len(kernels)} kernel rows\n")
    print(markdown(breakdown(kernels, total)), end="")


if __name__ == "__main__":
    main()
