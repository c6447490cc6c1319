"""Bad input, fuzzed: any spec file gives a TuningSpec or a SpecError naming the file and a field.

The examples in dags/ are mutated at any depth (a value replaced by one of every YAML type, a key
deleted, an unknown key added) and raw text is thrown at the loader. An accepted spec samples plain
JSON configurations and builds a planning problem the planner accepts.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from rubberband_airflow.planning.errors import ProblemError
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.search_space import sample, validate
from rubberband_airflow.spec import SpecError, TuningSpec, load_spec
from rubberband_airflow.tuning import planning_problem

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "dags").glob("*.yaml"))}
PROFILE = {"instance_type": {"name": "local-1", "gpus": 1, "pending_seconds": 1.0, "boot_seconds": 2.0,
                             "pending_sigma": 0.0},
           "epoch_seconds_measured": {"1": 3.0, "2": 1.8}, "trial_overhead_seconds": 0.5,
           "stage_overhead_seconds": 4.0, "straggler_sigma": 0.1, "checkpoint_gb": 0.01}

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Every YAML type, as yaml.safe_dump writes it and yaml.safe_load reads it back.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10_000), st.integers(min_value=2**63 - 2, max_value=2**200),
    st.sampled_from([0, -1, 1, 2**63, -(2**64), 10**15 + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308]),
    st.text(max_size=12), st.sampled_from(["", " ", "@daily", "@once", "0 2 * * *", "61 * * * *", "* * 31 2 *",
                                           "local", "ec2", "max", "min", "choice", "uniform", "int", "loguniform",
                                           "a:b", "x" * 300, "g5.xlarge", "${HOME}", "2026-01-01"]),
    st.dates(), st.datetimes(), st.binary(max_size=4), st.just({1, 2}),
)
keys = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.booleans(), st.none(), st.dates(), st.just(math.nan),
                 st.integers(min_value=2**64, max_value=2**70),
                 st.sampled_from(["type", "values", "low", "high", "name", "seed", "gpus", "max_instances"]))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in a document: the keys and indexes leading to it."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for k, v in enumerate(node):
            yield from paths(v, (*prefix, k))


def at(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """An example spec with one to three mutations, each anywhere in the document."""
    doc = json.loads(json.dumps(draw(st.sampled_from(sorted(EXAMPLES.items())))[1]))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(doc))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not where:
            if action == "replace":
                return draw(yaml_values)
            continue
        parent, last = at(doc, where[:-1]), where[-1]
        if action == "replace":
            parent[last] = draw(yaml_values)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(yaml_values)
        else:
            parent.append(draw(yaml_values))
    return doc


YAML_BITS = ["a: 1\n", "- x\n", "&a [*a]\n", "x: &a {b: *a}\n", "<<: *a\n", "? [1, 2]\n: 3\n", "!!timestamp x\n",
             "!!int abc\n", "!!float [1]\n", "!!binary AAAA\n", "!!set {a, b}\n", "!!omap [a: 1]\n", "!!python/none\n",
             "name: 2026-13-45\n", "n: 0x" + "f" * 400 + "\n", "n: 1e999\n", "---\n", "...\n", "{", "]", "\t", ":",
             "\"\\x\"", "\ufeff", "\x00", "%YAML 1.1\n", "n: 1:20:30\n", "name: [" * 3, "@", "`", "'", "\n",
             "search_space: {lr: {type: choice, values: [2026-01-01]}}\n", "tags: 5\n", "schedule: nope\n"]
raw_texts = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(YAML_BITS), max_size=8).map("".join),
                      st.binary(max_size=40))


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check(path: Path) -> TuningSpec | None:
    """The property: a TuningSpec, or a SpecError naming this file and a field, and nothing else."""
    try:
        spec = load_spec(path)
    except SpecError as e:
        assert e.path == str(path) and str(e).startswith(f"{path}: ")
        assert e.field and e.field.strip() and e.message, str(e)
        return None
    assert isinstance(spec, TuningSpec)
    return spec


def check_accepted(spec: TuningSpec, n: int, seed: int) -> None:
    """An accepted spec samples plain JSON and makes a planning problem the planner accepts."""
    configs = sample(spec.search_space, n, seed)
    assert len(configs) == n and json.loads(json.dumps(configs, allow_nan=False)) == configs
    assert all(isinstance(t, str) for t in spec.tags) and isinstance(spec.description, str)
    assert spec.schedule is None or isinstance(spec.schedule, str)
    parse_problem(planning_problem(spec, {}, PROFILE))


@FUZZ
@given(doc=mutated_specs(), n=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_mutated_specs_load_or_name_the_field(folder, doc, n, seed):
    path = folder / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = check(path)
    if spec is not None:
        check_accepted(spec, n, seed)


@settings(FUZZ, max_examples=100)
@given(text=raw_texts)
def test_any_text_loads_or_names_the_field(folder, text):
    path = folder / "raw.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check(path)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_load(name):
    spec = load_spec(ROOT / "dags" / name)
    check_accepted(spec, 8, 0)


def _write(folder: Path, example: str, **changes: Any) -> Path:
    doc = json.loads(json.dumps(EXAMPLES[example]))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# The crashes the fuzzing found (or the issue named), each a clear SpecError naming the field.
NAMED = [
    ({"tags": 5}, "tags", "must be a list of strings"),
    ({"tags": ["ok", 5]}, "tags[1]", "must be a non-empty string"),
    ({"tags": ["x" * 101]}, "tags[0]", "at most 100"),
    ({"description": 5}, "description", "must be a string"),
    ({"metric": 5}, "metric", "must be a non-empty string"),
    ({"metric": True}, "metric", "must be a non-empty string"),
    ({"search_space__width": {"type": "choice", "values": [16, datetime.date(2026, 1, 1)]}},
     "search_space.width.values[1]", "quote it ('2026-01-01')"),
    ({"search_space__width": {"type": "choice", "values": [{"a": [datetime.datetime(2026, 1, 1, 2, 0)]}]}},
     "search_space.width.values[0].a[0]", "YAML date or timestamp"),
    ({"search_space__width": {"type": "choice", "values": [math.nan]}}, "search_space.width.values[0]", "finite"),
    ({"search_space__width": {"type": "choice", "values": [{1: "a"}]}}, "search_space.width.values[0].1",
     "key must be a string"),
    ({"search_space__width": {"type": ["choice"], "values": [1]}}, "search_space.width.type", "must be one of"),
    ({"search_space__width": {"type": "choice", "values": [1], 1: 2, "x": 3}}, "search_space.width.1", "unknown key"),
    ({"search_space__width": 5}, "search_space.width", "must be a mapping"),
    ({"search_space": {1: {"type": "uniform", "low": 0, "high": 1}, "a": {"type": "uniform", "low": 0, "high": 1}}},
     "search_space.1", "parameter name must be a non-empty string"),
    ({"search_space__lr": {"type": "uniform", "low": -1e308, "high": 1e308}}, "search_space.lr.low", "within"),
    ({"schedule": "every night"}, "schedule", "cron expression"),
    ({"schedule": "61 * * * *"}, "schedule", "out of range"),
    ({"schedule": "* * 31 2 *"}, "schedule", "never fires"),
    ({"schedule": 5}, "schedule", "cron expression"),
    ({"billing": {"minimum_second": 60}}, "billing.minimum_second", "unknown key"),
    ({"billing": {"increment_seconds": 0}}, "billing.increment_seconds", "must be positive"),
    ({"planner": {"jct_quantile": 1.5}}, "planner.jct_quantile", "at most 1"),
    ({"planner": {"samples": 0}}, "planner.samples", "at least 1"),
    ({"planner": {"seed": -3}}, "planner.seed", "at least 0"),
    ({"planner": {"jct_quantiles": 0.9}}, "planner.jct_quantiles",
     "unknown key (allowed: jct_quantile, samples, seed)"),
    ({"mode": ["max"]}, "mode", "'max' or 'min'"),
    ({"name": "nightly tuning"}, "name", "DAG id"),
    ({"name": "x" * 251}, "name", "at most 250"),
    ({"trainable": "a:b:c"}, "trainable", "package.module:function"),
    ({"seed": 2**64}, "seed", "integer too large"),
    ({"backend__slots": 2000}, "backend.slots", "at most 1024"),
]


@pytest.mark.parametrize("changes,field,words", NAMED, ids=[n[1] for n in NAMED])
def test_bad_field_is_named(folder, changes, field, words):
    path = _write(folder, "digits_tuning.yaml", **changes)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.field == field and words in e.value.message, str(e.value)


EC2_NAMED = [
    ({"backend__region": 5}, "backend.region", "non-empty string"),
    ({"backend__aws_conn_id": ["x"]}, "backend.aws_conn_id", "non-empty string"),
    ({"backend__subnets": ["subnet-1", 5]}, "backend.subnets[1]", "non-empty string"),
    ({"backend__instance_types": [{"name": "g5.xlarge"}, {"name": "g5.xlarge"}]}, "backend.instance_types[1].name",
     "listed twice"),
    ({"backend__instance_types": [{"name": "x9", "gpus": 1.5, "price_per_hour": 1}]},
     "backend.instance_types[0].gpus", "must be an integer"),
    ({"backend__instance_types": [{"name": "g5.xlarge", "max_instances": 5000}]},
     "backend.instance_types[0].max_instances", "at most 4096"),
]


@pytest.mark.parametrize("changes,field,words", EC2_NAMED, ids=[n[1] for n in EC2_NAMED])
def test_bad_ec2_field_is_named(folder, changes, field, words):
    path = _write(folder, "nightly_ec2_tuning.yaml", **changes)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.field == field and words in e.value.message, str(e.value)


RAW = [
    ("", "yaml", "must be a mapping"),
    ("- a\n- b\n", "yaml", "must be a mapping"),
    ("a: [\n", "yaml", "not valid YAML"),
    ("name: 2026-13-45\n", "yaml", "not valid YAML"),
    ("name: !!timestamp x\n", "yaml", "not valid YAML"),
    ("x: &a [*a]\n", "x[0]", "contains itself"),
    ("x: " + "[" * 1000 + "]" * 1000 + "\n", "yaml", "nested too deeply"),
    ("x: " + "[" * 20 + "]" * 20 + "\n", "x[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]", "nested too deeply"),
    ("seed: 0x" + "f" * 2000 + "\n", "seed", "integer too large"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcde", "bcdef")),
     "yaml", "too large"),
]


@pytest.mark.parametrize("text,field,words", RAW, ids=[r[2] for r in RAW])
def test_bad_documents_are_named(folder, text, field, words):
    path = folder / "raw.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_unreadable_files_are_named(folder):
    (folder / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    (folder / "a_folder.yaml").mkdir(exist_ok=True)
    for path in (folder / "binary.yaml", folder / "a_folder.yaml", folder / "missing.yaml"):
        with pytest.raises(SpecError) as e:
            load_spec(path)
        assert e.value.field == "file" and "cannot be read" in e.value.message


def test_sample_rejects_what_is_not_json():
    """The search space checks hold for spaces built in Python too (sample validates first)."""
    bad = [({"d": {"type": "choice", "values": [datetime.date(2026, 1, 1)]}}, "search_space.d.values[0]"),
           ({"d": {"type": "choice", "values": [b"x"]}}, "search_space.d.values[0]"),
           ({"d": {"type": "int", "low": 0, "high": 2**70}}, "search_space.d.high")]
    for space, field in bad:
        with pytest.raises(ProblemError) as e:
            sample(space, 2, 0)
        assert e.value.field == field
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ProblemError, match="more than 8 deep"):
        validate({"d": {"type": "choice", "values": [cyclic]}})


def test_schedules_match_airflow():
    """What the spec accepts as a schedule Airflow accepts, and what it rejects Airflow rejects
    (or, for a cron that never fires, accepts but never runs)."""
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    from rubberband_airflow.spec import CRON_PRESETS, NON_CRON_PRESETS, _schedule

    good = [*CRON_PRESETS, *NON_CRON_PRESETS, "0 2 * * *", "*/15 * * * *", "0 9 * * mon-fri", "@annually"]
    for schedule in good:
        assert _schedule(schedule) == schedule
        DAG(dag_id="s", schedule=schedule, max_active_runs=1).timetable.validate()  # as the tuning DAG
    for schedule in ["every night", "61 * * * *", "0 2 * *", "@never", "H * * * *"]:
        with pytest.raises(ProblemError):
            _schedule(schedule)
        with pytest.raises(AirflowTimetableInvalid):
            DAG(dag_id="s", schedule=schedule, max_active_runs=1).timetable.validate()
