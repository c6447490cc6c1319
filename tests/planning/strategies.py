"""Hypothesis strategies: small random planning problems (JSON form) and plans for them."""

from __future__ import annotations

from hypothesis import strategies as st

from rubberband_airflow.planning.problem import Problem

seconds = st.one_of(st.integers(0, 120).map(float), st.floats(0, 120, allow_nan=False, allow_infinity=False))
positive = st.one_of(st.integers(1, 120).map(float), st.floats(0.5, 120))


@st.composite
def problems(draw, *, noise: bool = True, max_instances: int = 4, max_types: int = 2, max_trials: int = 24):
    gpus_options = draw(st.sets(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=3))
    curve = {str(g): draw(positive) for g in sorted(gpus_options)}
    smallest = min(gpus_options)
    types = []
    for k in range(draw(st.integers(1, max_types))):
        types.append({
            "name": f"type-{k}",
            "gpus": draw(st.sampled_from([g for g in (1, 2, 4, 8) if g >= smallest])),
            "price_per_hour": draw(st.floats(0.5, 40)),
            "pending_seconds": draw(seconds),
            "boot_seconds": draw(seconds),
            "pending_sigma": draw(st.sampled_from([0.0, 0.5])) if noise else 0.0,
            "max_instances": draw(st.integers(1, max_instances)),
        })
    problem = {
        "sha": {"num_trials": draw(st.integers(1, max_trials)), "eta": draw(st.integers(2, 4)),
                "min_epochs": draw(st.integers(1, 3))},
        "workload": {
            "epoch_seconds": curve,
            "trial_overhead_seconds": draw(seconds),
            "stage_overhead_seconds": draw(seconds),
            "straggler_sigma": draw(st.sampled_from([0.0, 0.3])) if noise else 0.0,
            "checkpoint_gb": draw(st.floats(0, 2)),
        },
        "instance_types": types,
        "billing": {"minimum_seconds": draw(st.sampled_from([0.0, 60.0])),
                    "increment_seconds": draw(st.sampled_from([1.0, 60.0])),
                    "data_price_per_gb": draw(st.floats(0, 0.1))},
        "deadline_seconds": draw(st.floats(100, 5000)),
        "planner": {"jct_quantile": draw(st.sampled_from([0.5, 0.9, 0.95])), "samples": draw(st.integers(1, 12)),
                    "seed": draw(st.integers(0, 2**16))},
    }
    # Drawn last, so that the problems drawn before it was modelled stay the same
    if teardown := draw(st.sampled_from([0.0, 0.0, 45.0, 7.5])):
        problem["workload"]["teardown_seconds"] = teardown
    return problem


@st.composite
def plans(draw, problem: Problem):
    t = draw(st.sampled_from([t for t in problem.instance_types if problem.gpu_options(t)]))
    stages = [{"gpus_per_trial": draw(st.sampled_from(problem.gpu_options(t))),
               "instances": draw(st.integers(1, t.max_instances))} for _ in range(problem.num_stages)]
    for stage in stages[1:]:  # pre-warming, on some stages
        if draw(st.booleans()):
            stage["launch_after_seconds"] = draw(seconds)
    return {"instance_type": t.name, "stages": stages}


@st.composite
def states(draw, problem: Problem, *, pending: bool = True, observed: bool = True):
    """A run in flight of the problem (section 7): next stage, elapsed time, live fleet, spending."""
    elapsed = draw(st.floats(0, 3000))
    fleet = []
    for _ in range(draw(st.integers(0, 4))):
        running = draw(st.floats(0, elapsed + (300 if pending else 0)))
        boot = draw(st.floats(0, 300 if pending else max(0.0, elapsed - running)))
        fleet.append({"instance_type": draw(st.sampled_from([t.name for t in problem.instance_types])),
                      "running_at_seconds": running, "ready_at_seconds": running + boot})
    state = {"next_stage": draw(st.integers(1, problem.num_stages)), "elapsed_seconds": elapsed,
             "spent_usd": draw(st.floats(0, 20)), "fleet": fleet}
    if observed:
        profiled = sorted(problem.workload.epoch_seconds)
        state["observed"] = {
            "epoch_seconds": {str(g): draw(positive) for g in draw(st.sets(st.sampled_from(profiled)))},
            **({"trial_overhead_seconds": draw(seconds)} if draw(st.booleans()) else {}),
            **({"stage_overhead_seconds": draw(seconds)} if draw(st.booleans()) else {}),
            "launch_seconds": {t.name: draw(seconds) for t in problem.instance_types if draw(st.booleans())},
        }
    return state
