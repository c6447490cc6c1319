"""The run view of a real finished run (two stages on the local backend, one trial failing), in
flight, with hostile names, through `rubberband report --html`, and drawn in headless Chromium."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from rubberband_airflow.cli import main
from rubberband_airflow.execution.backends.local import LocalBackend, LocalInstanceType
from rubberband_airflow.execution.runner import RunSpec, run_sha
from rubberband_airflow.execution.storage import RunStorage
from rubberband_airflow.planning.planner import plan_problem
from rubberband_airflow.planning.problem import parse_problem
from rubberband_airflow.report import build_report
from rubberband_airflow.run_view import _libraries, run_view_html
from rubberband_airflow.spec import load_spec
from rubberband_airflow.tuning import RunSnapshot, write_snapshot
from tests.execution.conftest import ROOT
from tests.fullstack.ui import CHROMIUM
from tests.run_view_dom import RunState, check_finished, check_theme, read_view, wait_drawn

HOSTILE = "</script><img src=x onerror=\"window.__pwned=1\">'"
HOSTILE_ID = "\"><svg onload=window.__pwned=2>"
SPEC = RunSpec("tests.trainables:plain", "accuracy", "max", seed=1)
# A deadline at which the planner's cheapest plan runs two instances in stage 1 and one after (2 -> 1 -> 1).
PROBLEM = {"sha": {"num_trials": 4, "eta": 2, "min_epochs": 2},
           "workload": {"epoch_seconds": {"1": 0.5}, "trial_overhead_seconds": 1.0, "stage_overhead_seconds": 1.0},
           "instance_types": [{"name": "local-1", "gpus": 1, "price_per_hour": 1.0, "pending_seconds": 0.3,
                               "boot_seconds": 0.4, "max_instances": 2}],
           "billing": {"minimum_seconds": 0}, "deadline_seconds": 16}
PLAN = {**plan_problem(parse_problem(PROBLEM)), "problem": PROBLEM}
# trial-0002's learning rate is no number: it fails in stage 1, with the hostile text in its reason.
CONFIGS = [{"lr": 0.1, "note": HOSTILE}, {"lr": 0.3}, {"lr": HOSTILE}, {"lr": 0.05}]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's folder, in a tuning DAG's folder, with its report."""
    root = tmp_path_factory.mktemp("view") / "view_dag" / "run-1"
    storage = RunStorage(f"file://{root}")
    backend = LocalBackend(storage, LocalInstanceType("local-1", 1, 0.3, 0.4), trial_timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        run_sha(storage, backend, SPEC, CONFIGS, PLAN, stage_timeout=120)
    finally:
        backend.terminate_all()
    storage.write_json(build_report(storage, "view_dag"), "report.json")
    return root


def _specs(page: str) -> dict:
    found = re.search(r"<script type='application/json' id='rb-specs'>(.*?)</script>", page, re.S)
    assert found, "the page embeds its chart specs"
    return json.loads(found.group(1))


def _layers(spec: dict) -> list[dict]:
    out = []
    for part in spec.get("vconcat", [spec]):
        out += part.get("layer", [part])
    return out


def _mark(layer: dict) -> str:
    return layer["mark"] if isinstance(layer["mark"], str) else layer["mark"]["type"]


def _values(spec: dict, mark: str) -> list[dict]:
    return [v for layer in _layers(spec) if _mark(layer) == mark
            for v in (layer.get("data") or spec.get("data"))["values"]]


def test_every_chart_holds_the_runs_real_numbers(run_dir):
    storage = RunStorage(f"file://{run_dir}")
    report = storage.read_json("report.json")
    page = run_view_html(storage, "view_dag")
    specs = _specs(page)
    assert set(specs) == {"fleet", "cost", "curves", "deadline"}

    # Fleet: every instance of the ledger, with its life from the ledger; two billed, then one.
    assert [s["instances"] for s in PLAN["stages"]] == [2, 1, 1]
    ledger = report["ledger"]
    assert len(ledger) == 2
    started = storage.read_json("run.json")["started"]
    bars = [b for b in _values(specs["fleet"], "bar") if b["source"] == "actual"]
    assert {b["instance"] for b in bars} == {e["instance"] for e in ledger}
    for e in ledger:
        phases = {b["phase"]: b for b in bars if b["instance"] == e["instance"]}
        assert phases["pending"]["start"] == pytest.approx(e["requested"] - started, abs=1e-3)
        assert phases["booting"]["start"] == pytest.approx(e["running"] - started, abs=1e-3)
        assert phases["ready"]["end"] == pytest.approx(e["terminated"] - started, abs=1e-3)
    steps = [s["instances"] for s in _values(specs["fleet"], "line") if s["series"] == "actual"]
    assert max(steps) == 2 and steps[-1] == 0 and 1 in steps[steps.index(2):]
    planned = [s["instances"] for s in _values(specs["fleet"], "line") if s["series"] == "planned"]
    assert max(planned) == 2  # the plan's stage 1 fleet
    barriers = _values(specs["fleet"], "rule")
    assert {b.get("label") for b in barriers} >= {"stage 1", "stage 2", "stage 3", "deadline"}

    # Cost: the actual curve ends at the report's bill; the planned one at the plan's cost.
    cost = _values(specs["cost"], "line")
    actual = [c for c in cost if c["series"] == "actual"]
    assert actual[-1]["cost"] == pytest.approx(report["actual"]["cost_usd"], rel=1e-9)
    assert [c["cost"] for c in actual] == sorted(c["cost"] for c in actual)
    texts = {t["label"] for t in _values(specs["cost"], "text")}
    assert f"actual ${report['actual']['cost_usd']:.4f}" in texts

    # Learning curves: every epoch of every trial's metrics.jsonl; the failed trial and its reason.
    points = {(c["trial"], c["epoch"]): c["metric"] for c in specs["curves"]["data"]["values"]}
    for trial in report["trials"]:
        for m in storage.metrics(trial):
            assert points[(trial, m["epoch"])] == m["accuracy"]
    reached = {c["trial"]: c["reached"] for c in specs["curves"]["data"]["values"]}
    assert reached == {t: max(int(s) for s in r["results"]) for t, r in report["trials"].items()
                       if storage.metrics(t)}
    assert report["stages"][0]["failed"] == ["trial-0002"]
    failure = report["trials"]["trial-0002"]["results"]["1"]["error"]
    assert html_escaped(f"trial-0002 in stage 1: {failure}") in page

    # Leaderboard: the best trial first, every trial once, the failure's reason shown.
    board = re.search(r"<table id='leaderboard'>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr class='(\w+)'><td>\d+</td><td>([^<]*)</td>", board)
    assert rows[0][1] == report["best"]["trial"]
    assert sorted(t for _, t in rows) == sorted(report["trials"])
    assert ("failed", "trial-0002") in rows

    # Cost against deadline: the re-planned curve, this plan's and this run's points, the baselines.
    curve = _values(specs["deadline"], "line")
    assert len(curve) >= 3 and any(c["deadline"] == report["deadline_seconds"] for c in curve)
    labels = {p["label"]: p for p in _values(specs["deadline"], "point")}
    assert labels["this run (actual JCT)"]["seconds"] == pytest.approx(report["actual"]["jct_seconds"], abs=1e-3)
    assert labels["this plan (predicted)"]["cost"] == pytest.approx(report["predicted"]["cost_usd"]["mean"])
    assert "best static allocation" in labels


def test_hostile_ids_configs_and_descriptions_are_escaped(run_dir, tmp_path):
    storage = _with_hostile_trial_id(run_dir, tmp_path / "hostile")
    page = run_view_html(storage, HOSTILE, description=HOSTILE).replace(_libraries(), "")  # the page's own parts
    assert "<img" not in page and "<svg onload" not in page
    assert html_escaped(HOSTILE) in page and html_escaped(HOSTILE_ID) in page
    specs = _specs(page)  # the embedded JSON still parses to the same values
    assert HOSTILE_ID in {c["trial"] for c in specs["curves"]["data"]["values"]}
    assert page.count("</script>") == page.count("<script")  # nothing closes a script early


def html_escaped(text: str) -> str:
    return html.escape(text)


def _with_hostile_trial_id(run_dir: Path, dest: Path) -> RunStorage:
    """A copy of the run with trial-0001 renamed to a hostile id everywhere the run's files name it."""
    shutil.copytree(run_dir, dest)
    (dest / "trials" / "trial-0001").rename(dest / "trials" / HOSTILE_ID)
    for path in (dest / "stages").rglob("*.json"):
        path.write_text(path.read_text().replace('"trial-0001"', json.dumps(HOSTILE_ID)))
    return RunStorage(f"file://{dest}")


def _in_flight(run_dir: Path, dest: Path) -> RunStorage:
    """A copy of the run as it was during stage 2: no end, no stage-2 results, its instance still up."""
    shutil.copytree(run_dir, dest)
    (dest / "report.json").unlink()
    (dest / "stages" / "2" / "end.json").unlink()
    shutil.rmtree(dest / "stages" / "3")
    for result in [*(dest / "trials").glob("*/stage-2.json"), *(dest / "trials").glob("*/stage-3.json")]:
        result.unlink()
    for entry in (dest / "ledger").glob("*.json"):
        data = json.loads(entry.read_text())
        if data["terminated"] > json.loads((dest / "stages" / "2" / "start.json").read_text())["time"]:
            data["terminated"] = None
            entry.write_text(json.dumps(data))
    return RunStorage(f"file://{dest}")


def test_a_run_in_flight_refreshes_and_shows_its_live_instance(run_dir, tmp_path):
    storage = _in_flight(run_dir, tmp_path / "live")
    page = run_view_html(storage, "view_dag", refresh_seconds=10)
    assert "(in flight)" in page and "<meta name='rb-refresh' content='10'>" in page
    specs = _specs(page)
    rows = {c["trial"]: c for c in specs["curves"]["data"]["values"]}
    assert rows and all(c["state"] in ("running", "done", "failed") for c in rows.values())
    assert not any(p["label"] == "this run (actual JCT)" for p in _values(specs["deadline"], "point"))
    # The cost of a run in flight is its bill so far, labelled so on the chart and in the figures.
    labels = [m["label"] for m in _values(specs["cost"], "text") if "label" in m]
    assert any(x.startswith("so far $") for x in labels) and not any(x.startswith("actual") for x in labels), labels
    assert "cost predicted / so far" in page and "cost predicted / actual" not in page


def test_the_pages_jct_is_the_reports_even_next_to_a_rounding_boundary(run_dir, tmp_path):
    """A JCT of 12.0496 s reads 12.0 s on the page as in the report (rounded to 3 digits first, it read 12.1 s)."""
    shutil.copytree(run_dir, tmp_path / "run")
    storage = RunStorage(f"file://{tmp_path / 'run'}")
    run = storage.read_json("run.json")
    end = run["started"] + build_report(storage, "view_dag")["actual"]["jct_seconds"]
    storage.write_json({**run, "started": end - 12.0496}, "run.json")
    report = build_report(storage, "view_dag")
    assert f"{report['actual']['jct_seconds']:.1f}" == "12.0"
    figures = dict((v, k) for k, v in re.findall(r"<div class='fig'><b>([^<]*)</b><span>([^<]*)</span>",
                                                 run_view_html(storage, "view_dag")))
    predicted = report["predicted"]["jct_seconds"]["mean"]
    assert html.unescape(figures["JCT predicted / actual"]) == f"{predicted:.1f} s / 12.0 s"


def test_report_html_through_the_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "view.html"
    assert main(["report", "--html", str(out), f"file://{run_dir.parent}"]) == 0  # the DAG's folder: newest run
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<title>view_dag · RubberBand</title>" in page
    assert "vegaEmbed" in page and "https://" not in re.sub(r"\"\$schema\": \"[^\"]*\"", "", page.split(
        "<script>", 1)[0])  # no CDN: the libraries are inlined
    assert set(_specs(page)) == {"fleet", "cost", "curves", "deadline"}


def _with_replan(storage: RunStorage) -> dict:
    """A re-plan before stage 2 in the run's files, where a re-planning run writes it (stages/<i>/replan.json):
    the plan's stages 2 and 3 on two instances instead of one."""
    plan = storage.read_json("plan.json")
    after = {**plan, "stages": [plan["stages"][0]] + [{**s, "instances": 2} for s in plan["stages"][1:]],
             "predicted": {**plan["predicted"], "cost_usd": {"mean": 0.0123}}}
    replan = {"time": storage.read_json("stages", "2", "start.json")["time"] - 0.25, "before": plan, "after": after}
    storage.write_json(replan, "stages", "2", "replan.json")
    return replan


def fleet_events(storage: RunStorage) -> dict[str, dict]:
    """The recovery and re-plan marks on the run view's fleet chart, by label."""
    return {v["label"]: v for v in _values(_specs(run_view_html(storage, "run"))["fleet"], "rule") if "kind" in v}


def test_replans_are_marked_on_the_fleet_chart_and_listed(run_dir, tmp_path):
    assert fleet_events(RunStorage(f"file://{run_dir}")) == {}  # none in the run's files: no mark
    shutil.copytree(run_dir, tmp_path / "run")
    storage = RunStorage(f"file://{tmp_path / 'run'}")
    replan = _with_replan(storage)
    mark = fleet_events(storage)["re-plan before stage 2"]
    assert mark["kind"] == "re-plan"
    assert mark["t"] == pytest.approx(replan["time"] - storage.read_json("run.json")["started"], abs=1e-3)
    assert mark["detail"] == "instances per stage 2 → 1 → 1 to 2 → 2 → 2; predicted cost $0.0056 to $0.0123, JCT " \
        f"{PLAN['predicted']['jct_seconds']['mean']:.1f} s to {PLAN['predicted']['jct_seconds']['mean']:.1f} s"
    page = run_view_html(storage, "run")
    assert f"<li>{mark['t']:.1f} s: re-plan before stage 2: {html.escape(mark['detail'])}</li>" in page


chromium = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} "
                              "(scripts/install-test-tools.sh)")


@chromium
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_report_html_in_chromium_draws_the_runs_numbers(run_dir, tmp_path, scheme, capsys):
    """`rubberband report --html` of a run with hostile trial ids, configurations and DAG description,
    opened in Chromium in the browser's light or dark scheme."""
    from playwright.sync_api import sync_playwright

    storage = _with_hostile_trial_id(run_dir, tmp_path / "view_dag" / "run-1")
    spec = load_spec(ROOT / "dags" / "digits_tuning.yaml")
    write_snapshot(storage, RunSnapshot(dataclasses.replace(spec, description=HOSTILE), {}, 1, "default"))
    storage.write_json(build_report(storage, "view_dag"), "report.json")
    replan = _with_replan(storage)
    out = tmp_path / "view.html"
    assert main(["report", "--html", str(out), storage.uri]) == 0
    assert str(out) in capsys.readouterr().out

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, color_scheme=scheme)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            wait_drawn(page, scheme)
            view = read_view(page)
            page.screenshot(path=str(tmp_path / f"report-{scheme}.png"), full_page=True)
            subtitle = page.locator(".sub").text_content()
        finally:
            browser.close()
    assert errors == []
    check_finished(view, RunState.read(storage))
    check_theme(view, dark=scheme == "dark")
    assert HOSTILE_ID in {r["trial"] for r in view.leaderboard}
    assert subtitle.startswith(HOSTILE) and storage.uri in subtitle  # the run's DAG description, as text
    started = storage.read_json("run.json")["started"]
    mark = view.labelled("fleet", "rule mark")["re-plan before stage 2"]
    assert float(mark["seconds"]) == pytest.approx(replan["time"] - started, abs=2e-3)
    [event] = view["events"]
    assert event.startswith(f"{replan['time'] - started:.1f} s: re-plan before stage 2: instances per stage "
                            "2 → 1 → 1 to 2 → 2 → 2; predicted cost $0.0056 to $0.0123")


def test_embedded_json_has_no_markup_and_no_nan():
    from rubberband_airflow.run_view import _script_json

    text = _script_json({"trial": HOSTILE, "metric": float("nan"), "cost": [1.5, float("inf")]})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"trial": HOSTILE, "metric": None, "cost": [1.5, None]}
