"""What a user sees of a run view in Chromium, read from the drawn page's DOM, and checked against
the run's storage: the figures, the leaderboard, and every chart's marks (Vega writes each mark's
values into its SVG element's ``aria-label``, "field: value; field: value")."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from rubberband_airflow.execution.storage import RunStorage

if TYPE_CHECKING:
    from playwright.sync_api import Frame, Page

CHARTS = ("fleet", "cost", "curves", "deadline")

_READ = """() => {
  const marks = {};
  for (const id of %s) {
    marks[id] = Array.from(document.querySelectorAll('#chart-' + id + ' svg [aria-roledescription]'))
      .map(e => [e.getAttribute('aria-roledescription'), e.getAttribute('aria-label') || '']);
  }
  const text = sel => Array.from(document.querySelectorAll(sel)).map(e => e.textContent);
  return {
    marks,
    title: document.querySelector('h1').textContent,
    figures: Object.fromEntries(Array.from(document.querySelectorAll('.fig'))
      .map(f => [f.querySelector('span').textContent, f.querySelector('b').textContent])),
    rows: Array.from(document.querySelectorAll('#leaderboard tbody tr'))
      .map(tr => Array.from(tr.cells).map(td => td.textContent)),
    events: text('#events li'),
    theme: document.documentElement.getAttribute('data-theme'),
    rendered: text('.chart').length && Array.from(document.querySelectorAll('.chart'))
      .map(c => c.getAttribute('data-rendered')),
    background: getComputedStyle(document.body).backgroundColor,
    axisLabel: (document.querySelector('#chart-cost svg .role-axis-label text') || {}).getAttribute
      ? getComputedStyle(document.querySelector('#chart-cost svg .role-axis-label text')).fill : null,
    injected: document.querySelectorAll('img, iframe, svg[onload], [onerror]').length,
    pwned: window.__pwned === undefined ? null : window.__pwned,
  };
}""" % list(CHARTS)  # noqa: UP031 - a JS literal


@dataclass(frozen=True)
class View:
    """A drawn run view as the DOM holds it."""

    data: dict[str, Any]

    def marks(self, chart: str, role: str) -> list[dict[str, str]]:
        """The chart's marks of an aria role (``bar``, ``point``, ``rule mark``, ``text mark``...), as field dicts."""
        return [_fields(label) for r, label in self.data["marks"][chart] if r == role]

    def labelled(self, chart: str, role: str) -> dict[str, dict[str, str]]:
        """The chart's marks of a role by their ``label`` field."""
        return {m["label"]: m for m in self.marks(chart, role) if "label" in m}

    @property
    def leaderboard(self) -> list[dict[str, str]]:
        return [dict(zip(("rank", "trial", "metric", "stage", "state", "config"), row)) for row in self.data["rows"]]

    @property
    def dark(self) -> bool:
        """Whether the page is drawn dark: its theme, background and axis labels (light text on dark)."""
        return self.data["theme"] == "dark"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def _fields(label: str) -> dict[str, str]:
    out = {}
    for part in label.split("; "):
        key, sep, value = part.partition(": ")
        if sep:
            out[key] = value
    return out


def wait_drawn(frame: Page | Frame, theme: str | None = None, timeout_s: float = 60) -> None:
    """Wait until every chart is drawn (in ``theme``, if given)."""
    want = f"=\"{theme}\"" if theme else ""
    frame.wait_for_function(f"document.querySelectorAll('.chart[data-rendered{want}]').length === {len(CHARTS)}",
                            timeout=timeout_s * 1000)


def read_view(frame: Page | Frame) -> View:
    """The drawn view's figures, leaderboard and marks; every chart has drawn an SVG with marks."""
    view = View(frame.evaluate(_READ))
    for chart in CHARTS:
        assert frame.locator(f"#chart-{chart} svg").count() == 1, f"chart {chart} has no SVG"
        assert len(view["marks"][chart]) > 3, f"chart {chart} has drawn almost nothing: {view['marks'][chart]}"
    assert view["injected"] == 0 and view["pwned"] is None, "markup from the run's files made it into the page"
    return view


def _luminance(css_rgb: str) -> float:
    r, g, b = (float(x) for x in css_rgb[css_rgb.index("(") + 1:css_rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def check_theme(view: View, dark: bool) -> None:
    """Drawn in the theme asked for: the page's background and the charts' axis labels contrast."""
    assert view["theme"] == ("dark" if dark else "light")
    assert view["rendered"] == [view["theme"]] * len(CHARTS)
    background, labels = _luminance(view["background"]), _luminance(view["axisLabel"])
    if dark:
        assert background < 0.2 and labels > 0.6, (view["background"], view["axisLabel"])
    else:
        assert background > 0.9 and labels < 0.4, (view["background"], view["axisLabel"])


def _num(value: str) -> float:
    return float(value.replace("$", ""))


def _approx(value: float) -> Any:
    return pytest.approx(value, abs=2e-3, rel=1e-6)


@dataclass(frozen=True)
class RunState:
    """A run's files at one moment, as a view drawn after that moment must show at least."""

    plan: dict[str, Any]
    run: dict[str, Any]
    ledger: list[dict[str, Any]]
    stage_starts: dict[int, float]
    metrics: dict[str, list[dict[str, Any]]]
    report: dict[str, Any] | None
    at: float  # when the files were read (Unix seconds)

    @classmethod
    def read(cls, storage: RunStorage) -> RunState:
        at = time.time()
        stages = sorted(int(s) for s in storage.listdir("stages") if s.isdigit())
        starts = {s: r["time"] for s in stages if (r := storage.read_json("stages", str(s), "start.json"))}
        return cls(storage.read_json("plan.json"), storage.read_json("run.json"), storage.ledger(), starts,
                   {t: storage.metrics(t) for t in storage.subfolders("trials")}, storage.read_json("report.json"), at)


def check_common(view: View, state: RunState) -> None:
    """What a run's view shows in flight and finished alike: the plan's figures and marks, every instance
    and stage so far, every epoch recorded so far, every trial."""
    plan, started, metric = state.plan, state.run["started"], state.run["metric"]
    predicted = plan["predicted"]["cost_usd"]["mean"]
    assert view.labelled("cost", "text mark")[f"planned ${predicted:.4f}"]
    this_plan = view.labelled("deadline", "point")["this plan (predicted)"]
    assert _num(this_plan["cost"]) == _approx(predicted)
    assert _num(this_plan["seconds"]) == _approx(plan["deadline_seconds"])
    assert _num(view.labelled("fleet", "rule mark")["deadline"]["t"]) == _approx(plan["deadline_seconds"])

    # Fleet: every instance of the ledger, its request and (if over) its termination where the ledger has them.
    bars = [b for b in view.marks("fleet", "bar") if b["source"] == "actual"]
    assert state.ledger, "no instance was requested yet"
    for entry in state.ledger:
        phases = {b["phase"]: b for b in bars if b["instance"] == entry["instance"]}
        assert phases, f"instance {entry['instance']} of the ledger is not on the fleet chart"
        first = phases.get("pending") or phases.get("booting") or phases["ready"]
        assert _num(first["from (s)"]) == _approx(entry["requested"] - started)
        if entry.get("terminated") is not None:
            assert _num(phases["ready"]["to (s)"]) == _approx(entry["terminated"] - started)
    stages = view.labelled("fleet", "rule mark")
    for stage, start in state.stage_starts.items():
        assert _num(stages[f"stage {stage}"]["started (s)"]) == _approx(start - started)

    # Learning curves: a point for every epoch recorded; the leaderboard: every trial.
    points = {(p["trial"], int(p["epoch"])): _num(p[metric]) for p in view.marks("curves", "point") if "trial" in p}
    for trial, records in state.metrics.items():
        for m in records:
            assert points.get((trial, m["epoch"])) == _approx(m[metric]), (trial, m)
    assert sorted(r["trial"] for r in view.leaderboard) == sorted(state.metrics)


def check_finished(view: View, state: RunState) -> None:
    """A finished run's view shows what its report says."""
    check_common(view, state)
    report = state.report
    assert report is not None, "the run has no report"
    assert view["title"].endswith("(finished)")
    (pj, pc), (aj, ac) = ((report["predicted"][k]["mean"] for k in ("jct_seconds", "cost_usd")),
                          (report["actual"][k] for k in ("jct_seconds", "cost_usd")))
    assert view["figures"]["cost predicted / actual"] == f"${pc:.4f} / ${ac:.4f}"
    assert view["figures"]["JCT predicted / actual"] == f"{pj:.1f} s / {aj:.1f} s"
    assert view.labelled("cost", "text mark")[f"actual ${ac:.4f}"]
    this_run = view.labelled("deadline", "point")["this run (actual JCT)"]
    assert _num(this_run["seconds"]) == _approx(aj) and _num(this_run["cost"]) == _approx(ac)
    assert {b["instance"] for b in view.marks("fleet", "bar") if b["source"] == "actual"} == \
        {e["instance"] for e in report["ledger"]}

    # The leaderboard: the best trial first; each trial's stage reached and its last metric (or its failure).
    board = view.leaderboard
    assert board[0]["trial"] == report["best"]["trial"]
    for row in board:
        results = report["trials"][row["trial"]]["results"]
        reached = max(int(s) for s in results)
        last = results[str(reached)]
        assert row["stage"] == str(reached)
        if last["state"] == "done":
            assert row["metric"] == f"{last['metric']:.4f}" and row["state"] == "done"
        else:
            assert row["metric"] == "–" and row["state"] == f"failed: {last['error']}"
    done = sum(1 for r in board if r["state"] == "done")
    assert view["figures"]["trials done"] == f"{done} / {len(report['trials'])}"


def check_in_flight(view: View, before: RunState) -> None:
    """A run in flight: at least what its files held ``before`` the page was read, no actual totals yet."""
    check_common(view, before)
    assert view["title"].endswith("(in flight)")
    assert "this run (actual JCT)" not in view.labelled("deadline", "point")
    assert view["figures"]["JCT predicted / actual"].endswith(" / –")
    # The cost is the bill so far, and says so.
    assert "cost predicted / actual" not in view["figures"]
    so_far = [k for k in view.labelled("cost", "text mark") if k.startswith("so far $")]
    assert view["figures"]["cost predicted / so far"].endswith(" / " + so_far[0][len("so far "):]), so_far
    live = [e["instance"] for e in before.ledger if e.get("terminated") is None]
    assert live, "no instance is up"
    for instance in live:  # its life runs on to (at least) the moment the files were read
        end = max(_num(b["to (s)"]) for b in view.marks("fleet", "bar") if b["instance"] == instance)
        assert end >= before.at - before.run["started"] - 1.0, (instance, end)
