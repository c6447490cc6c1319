"""Readable text for a plan and its baselines (what `rubberband plan --table` prints)."""

from __future__ import annotations

from typing import Any


def _money(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.4f}"


def _secs(x: float) -> str:
    return f"{x:,.0f} s ({x / 60:.1f} min)"


def plan_table(result: dict[str, Any]) -> str:
    """A plan result of `plan_problem` as a table: stages, prediction, and savings against baselines."""
    pred = result["predicted"]
    q = result["jct_quantile"]
    lines = [
        f"Plan ({result['method']}): {result['instance_type']}, deadline {_secs(result['deadline_seconds'])}",
        "",
        f"{'stage':>5}  {'trials':>6}  {'epochs':>6}  {'GPUs/trial':>10}  {'instances':>9}  {'GPUs':>5}",
    ]
    for i, s in enumerate(result["stages"], start=1):
        gpus = s["instances"] * result["gpus_per_instance"]
        lines.append(f"{i:>5}  {s['trials']:>6}  {s['epochs']:>6}  {s['gpus_per_trial']:>10}  "
                     f"{s['instances']:>9}  {gpus:>5}")
    jct, cost = pred["jct_seconds"], pred["cost_usd"]
    lines += [
        "",
        f"Predicted JCT:  mean {_secs(jct['mean'])}, p{q * 100:g} {_secs(jct['quantile'])}",
        f"Predicted cost: mean {_money(cost['mean'])}, p95 {_money(cost['p95'])}  ({result['samples']} samples)",
        "",
        f"{'baseline':<18} {'cost':>10} {'JCT p' + format(q * 100, 'g'):>12}  {'this plan saves':>15}  plan",
    ]
    base = result["baselines"]
    for name in ("static_allocation", "static_cluster"):
        b = base[name]
        label = name.replace("_", " ")
        if not b["feasible"]:
            fastest = b["fastest"]["predicted"]["jct_seconds"]["quantile"]
            lines.append(f"{label:<18} {'misses deadline':>23}  {'':>15}  fastest {fastest:,.0f} s")
            continue
        bc = b["predicted"]["cost_usd"]["mean"]
        saving = (bc - cost["mean"]) / bc * 100
        stages = " ".join(f"{s['instances']}x{s['gpus_per_trial']}g" for s in b["stages"])
        lines.append(f"{label:<18} {_money(bc):>10} {b['predicted']['jct_seconds']['quantile']:>10,.0f} s  "
                     f"{saving:>14.1f}%  {b['instance_type']} {stages}")
    lb = base["lower_bound"]["cost_usd"]
    lines.append(f"{'lower bound':<18} {_money(lb):>10} {'':>12}  {'':>15}  "
                 f"plan is {cost['mean'] / lb:.2f}x the bound")
    return "\n".join(lines)

