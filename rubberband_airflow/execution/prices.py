"""A dated table of EC2 GPU instance types: GPUs per instance, GPU model, on-demand price.

Prices are us-east-1 on-demand Linux, as published mid-2025 (taken 2025-07) in the AWS public
on-demand price list; override for your region and discounts. P4d and P5 on-demand prices
are those after AWS's June 2025 cut (before it: p4d.24xlarge $32.7726, p5.48xlarge $98.32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

PRICES_TAKEN = "2025-07"
PRICES_SOURCE = ("AWS public on-demand price list: us-east-1 on-demand Linux, as published mid-2025; "
                 "override for your region and discounts")


@dataclass(frozen=True)
class GpuInstanceType:
    name: str
    gpus: int
    gpu_model: str
    gpu_memory_gb: int  # per GPU
    price_per_hour: float  # USD, on demand


TABLE: dict[str, GpuInstanceType] = {t.name: t for t in [
    GpuInstanceType("p3.2xlarge", 1, "NVIDIA V100", 16, 3.06),
    GpuInstanceType("p3.8xlarge", 4, "NVIDIA V100", 16, 12.24),
    GpuInstanceType("p3.16xlarge", 8, "NVIDIA V100", 16, 24.48),
    GpuInstanceType("p4d.24xlarge", 8, "NVIDIA A100", 40, 21.96),
    GpuInstanceType("p5.48xlarge", 8, "NVIDIA H100", 80, 55.04),
    GpuInstanceType("g4dn.xlarge", 1, "NVIDIA T4", 16, 0.526),
    GpuInstanceType("g4dn.12xlarge", 4, "NVIDIA T4", 16, 3.912),
    GpuInstanceType("g4dn.metal", 8, "NVIDIA T4", 16, 7.824),
    GpuInstanceType("g5.xlarge", 1, "NVIDIA A10G", 24, 1.006),
    GpuInstanceType("g5.12xlarge", 4, "NVIDIA A10G", 24, 5.672),
    GpuInstanceType("g5.48xlarge", 8, "NVIDIA A10G", 24, 16.288),
    GpuInstanceType("g6.xlarge", 1, "NVIDIA L4", 24, 0.8048),
    GpuInstanceType("g6.12xlarge", 4, "NVIDIA L4", 24, 4.6016),
    GpuInstanceType("g6.48xlarge", 8, "NVIDIA L4", 24, 13.3504),
]}


def lookup(name: str, price_overrides: Mapping[str, float] | None = None) -> GpuInstanceType:
    """The table's entry for ``name``, its price replaced where ``price_overrides`` gives one (USD/hour)."""
    try:
        entry = TABLE[name]
    except KeyError:
        raise KeyError(f"no GPU instance type {name!r} in the price table (it has {', '.join(TABLE)})") from None
    if price_overrides and name in price_overrides:
        price = float(price_overrides[name])
        if not price > 0:
            raise ValueError(f"the price override for {name} must be positive, got {price!r}")
        entry = replace(entry, price_per_hour=price)
    return entry
