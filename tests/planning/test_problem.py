import copy

import pytest

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.plan import parse_plan
from rubberband_airflow.planning.problem import parse_problem
from tests.conftest import WORKED_PLAN


def test_example_parses_with_defaults(resnet_problem):
    p = parse_problem(resnet_problem)
    assert p.num_stages == 4
    assert [p.sha.trials(i) for i in range(1, 5)] == [64, 16, 4, 1]
    assert [p.sha.epochs(i) for i in range(1, 5)] == [1, 4, 16, 64]
    assert [p.sha.new_epochs(i) for i in range(1, 5)] == [1, 3, 12, 48]
    assert p.instance_types[0].pending_sigma == 0 and p.planner.samples == 256 and p.planner.seed == 0
    assert p.deterministic


def test_num_stages_limits_the_stages(resnet_problem):
    resnet_problem["sha"]["num_stages"] = 2
    assert parse_problem(resnet_problem).num_stages == 2


def test_trials_never_drop_below_one(resnet_problem):
    resnet_problem["sha"] = {"num_trials": 10, "eta": 3, "min_epochs": 2}
    p = parse_problem(resnet_problem)
    assert p.num_stages == 3 and [p.sha.trials(i) for i in (1, 2, 3)] == [10, 3, 1]


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()

BAD = [
    (("sha", "colour"), "blue", "sha.colour", "unknown key"),
    (("surprise",), 1, "surprise", "unknown key"),
    (("instance_types", 0, "gpu"), 4, "instance_types[0].gpu", "unknown key"),
    (("sha", "num_trials"), "64", "sha.num_trials", "must be an integer"),
    (("sha", "num_trials"), 64.0, "sha.num_trials", "must be an integer"),
    (("sha", "eta"), 1, "sha.eta", "at least 2"),
    (("sha", "eta"), True, "sha.eta", "must be an integer"),
    (("sha", "num_stages"), 9, "sha.num_stages", "at most 4"),
    (("sha", "min_epochs"), _DELETE, "sha.min_epochs", "is required"),
    (("workload", "epoch_seconds", "3"), 20, "workload.epoch_seconds.3", "power of two"),
    (("workload", "epoch_seconds", "x"), 20, "workload.epoch_seconds.x", "positive integer"),
    (("workload", "epoch_seconds", "²"), 20, "workload.epoch_seconds.²", "positive integer"),
    (("workload", "epoch_seconds", "1"), 0, "workload.epoch_seconds.1", "must be positive"),
    (("workload", "epoch_seconds"), {}, "workload.epoch_seconds", "non-empty"),
    (("workload", "trial_overhead_seconds"), -1, "workload.trial_overhead_seconds", "must not be negative"),
    (("workload", "stage_overhead_seconds"), None, "workload.stage_overhead_seconds", "must be a number"),
    (("workload", "straggler_sigma"), -0.1, "workload.straggler_sigma", "must not be negative"),
    (("instance_types",), [], "instance_types", "non-empty list"),
    (("instance_types", 0, "gpus"), 0, "instance_types[0].gpus", "at least 1"),
    (("instance_types", 1, "price_per_hour"), 0, "instance_types[1].price_per_hour", "must be positive"),
    (("instance_types", 1, "pending_seconds"), -5, "instance_types[1].pending_seconds", "must not be negative"),
    (("instance_types", 2, "boot_seconds"), _DELETE, "instance_types[2].boot_seconds", "is required"),
    (("instance_types", 2, "name"), "p3.8xlarge", "instance_types[2].name", "listed twice"),
    (("instance_types", 0, "max_instances"), 0, "instance_types[0].max_instances", "at least 1"),
    (("deadline_seconds",), 0, "deadline_seconds", "must be positive"),
    (("deadline_seconds",), 10**400, "deadline_seconds", "too large"),
    (("deadline_seconds",), float("nan"), "deadline_seconds", "finite"),
    (("deadline_seconds",), _DELETE, "deadline_seconds", "is required"),
    (("billing", "increment_seconds"), 0, "billing.increment_seconds", "must be positive"),
    (("billing", "hourly"), True, "billing.hourly", "unknown key"),
    (("planner",), {"jct_quantile": 1.5}, "planner.jct_quantile", "at most 1"),
    (("planner",), {"samples": 0}, "planner.samples", "at least 1"),
    (("planner",), [], "planner", "must be an object"),
]


@pytest.mark.parametrize("path,value,field,words", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_input_names_the_field(resnet_problem, path, value, field, words):
    data = copy.deepcopy(resnet_problem)
    _set(data, path, value)
    with pytest.raises(ProblemError) as err:
        parse_problem(data)
    assert err.value.field == field
    assert words in err.value.message
    assert str(err.value).startswith(field + ":")


def test_gpu_counts_that_fit_no_instance(resnet_problem):
    resnet_problem["workload"]["epoch_seconds"] = {"16": 5}
    with pytest.raises(ProblemError) as err:
        parse_problem(resnet_problem)
    assert err.value.field == "workload.epoch_seconds" and "fits on any instance type" in err.value.message


PLAN_BAD = [
    ({"instance_type": "p4d.24xlarge"}, "plan.instance_type", "not an instance type"),
    ({"stages": WORKED_PLAN["stages"][:3]}, "plan.stages", "one entry per stage (4)"),
    ({"stages": [{"gpus_per_trial": 8, "instances": 1}] * 4}, "plan.stages[0].gpus_per_trial", "fits on one"),
    ({"stages": [{"gpus_per_trial": 1, "instances": 17}] * 4}, "plan.stages[0].instances", "between 1 and"),
    ({"stages": [{"gpus_per_trial": 1, "instances": 0}] * 4}, "plan.stages[0].instances", "between 1 and"),
    ({"stages": [{"gpus_per_trial": 1}] * 4}, "plan.stages[0].instances", "is required"),
    ({"stages": [{"gpus_per_trial": "1", "instances": 1}] * 4}, "plan.stages[0].gpus_per_trial", "integer"),
]


@pytest.mark.parametrize("change,field,words", PLAN_BAD, ids=[b[1] for b in PLAN_BAD])
def test_bad_plan_names_the_field(resnet_problem, change, field, words):
    problem = parse_problem(resnet_problem)
    with pytest.raises(ProblemError) as err:
        parse_plan({**WORKED_PLAN, **change}, problem)
    assert err.value.field == field and words in err.value.message


def test_plan_may_carry_extra_keys(resnet_problem):
    problem = parse_problem(resnet_problem)
    plan = parse_plan({**WORKED_PLAN, "predicted": {"jct_seconds": 1}, "note": "x"}, problem)
    assert plan.to_dict()["stages"][3] == {"gpus_per_trial": 4, "instances": 1}
