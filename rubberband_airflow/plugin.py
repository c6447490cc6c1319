"""The Airflow UI plugin: a RubberBand page listing tuning runs and their reports.

Mounted on the api-server at ``/rubberband``; the page shows, per tuning DAG, the latest best
configuration and each run's predicted against actual JCT and cost, each run linked to its run view
(``/rubberband/runs/<dag>/<run>``, also the RubberBand tab of every DAG run). It is behind Airflow's own
login (the UI's session cookie, or a bearer token from ``/auth/token``), and shows a user only
the DAGs whose runs Airflow's auth manager lets that user read.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse

from rubberband_airflow.hooks.storage import storage_for
from rubberband_airflow.report import newest_reports, report_end
from rubberband_airflow.spec import SpecError, load_spec
from rubberband_airflow.tuning import dag_uri, latest_attempt, run_uri

log = logging.getLogger(__name__)


def _specs(user: Any) -> list[Any]:
    """The tuning specs in the dags folder (``[core] dags_folder``) whose DAG runs ``user`` may read."""
    folder = Path(conf.get_mandatory_value("core", "dags_folder"))
    out = []
    for path in sorted(folder.expanduser().glob("*.yaml")):
        try:
            spec = load_spec(path)
        except SpecError:
            continue
        if get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=spec.name), user=user):
            out.append(spec)
    return out


def _reports(spec: Any) -> list[dict[str, Any]]:
    """The reports of a DAG's runs, the latest to end first; none if its storage cannot be read from here."""
    try:
        found = newest_reports(storage_for(spec, dag_uri(spec)))
    except Exception as e:  # noqa: BLE001 - one unreachable bucket must not take the page down
        log.warning("cannot list runs of %s in %s: %s", spec.name, spec.storage, e)
        return []
    return [{"run": run, "ended": report_end(rep), **{k: rep.get(k) for k in ("best", "predicted", "actual", "metric")},
             "complete": rep.get("complete", True), "stages_planned": rep.get("stages_planned"),
             "stages_ended": (rep.get("stages") or [{}])[-1].get("stage", 0)}
            for run, rep in found]


def create_app() -> FastAPI:
    """The page and its JSON API, mounted by the plugin at ``/rubberband``."""
    app = FastAPI(title="RubberBand", description="Tuning runs and their reports")

    @app.get("/api/runs")
    def runs(user: GetUserDep) -> JSONResponse:
        return JSONResponse({s.name: _reports(s) for s in _specs(user)})

    @app.get("/api/runs/{dag_id}/{run}")
    def run_report(dag_id: str, run: str, user: GetUserDep) -> JSONResponse:
        spec = next((s for s in _specs(user) if s.name == dag_id), None)
        if spec is None or "/" in run or run.startswith("."):
            raise HTTPException(404, "no such tuning DAG or run")
        rep = storage_for(spec, f"{dag_uri(spec)}/{run}").read_json("report.json")
        if rep is None:
            raise HTTPException(404, "this run has no report yet")
        return JSONResponse(rep)

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_view(dag_id: str, run_id: str, user: GetUserDep) -> str:
        """The run view of one DAG run (the RubberBand tab of a run), refreshing while the run is in flight."""
        from rubberband_airflow.run_view import page_html, run_view_html

        spec = next((s for s in _specs(user) if s.name == dag_id), None)
        if spec is None:
            raise HTTPException(404, "not a tuning DAG you may read")
        attempt = latest_attempt(storage_for(spec, dag_uri(spec)).subfolders(), run_id)  # a cleared run's newest
        storage = storage_for(spec, run_uri(spec, dag_id, run_id, attempt))
        if not storage.exists("plan.json"):
            return page_html(f"{dag_id} / {run_id}", f"<p>{html.escape(dag_id)} / {html.escape(run_id)}: the run "
                             "has not started yet.</p>", "<meta http-equiv='refresh' content='10'>")
        title = f"{spec.name} / {run_id}" + (f" (attempt {attempt})" if attempt > 1 else "")
        return run_view_html(storage, title, spec.description or "", refresh_seconds=10)

    @app.get("/", response_class=HTMLResponse)
    def page(user: GetUserDep) -> str:
        from rubberband_airflow.run_view import page_html

        rows = []
        for spec in _specs(user):
            for r in _reports(spec):
                best = r["best"] or {}
                pj = ((r["predicted"] or {}).get("jct_seconds") or {}).get("mean")
                pc = ((r["predicted"] or {}).get("cost_usd") or {}).get("mean")
                aj, ac = (r["actual"] or {}).get("jct_seconds"), (r["actual"] or {}).get("cost_usd")
                href = f"runs/{quote(spec.name, safe='')}/{quote(r['run'], safe='')}"
                ended = "" if r["complete"] else (f" <strong>incomplete</strong>: ended after stage {r['stages_ended']}"
                                                  f" of {r['stages_planned']}")
                link = f"<td><a href='{href}'>{html.escape(r['run'])}</a>{ended}</td>"
                rows.append(f"<tr><td>{html.escape(spec.name)}</td>{link}<td>{html.escape(str(best.get('trial', '-')))}"
                            "</td>" + "".join(f"<td class='num'>{html.escape(x)}</td>" for x in (
                                f"{best['metric']:.4f}" if best.get("metric") is not None else "-",
                                f"{pj:.0f} / {aj:.0f}" if pj is not None and aj is not None else "-",
                                f"{pc:.4f} / {ac:.4f}" if pc is not None and ac is not None else "-")) + "</tr>")
        table = "".join(rows) or "<tr><td colspan=6>No tuning run has reported yet.</td></tr>"
        return page_html("Tuning runs", "<h1>RubberBand tuning runs</h1><table><thead><tr><th>DAG</th><th>run</th>"
                         "<th>best trial</th><th>metric</th><th>JCT s (predicted / actual)</th>"
                         f"<th>cost $ (predicted / actual)</th></tr></thead><tbody>{table}</tbody></table>")

    return app


class RubberBandPlugin(AirflowPlugin):
    """The RubberBand page on the api-server, listed under Browse (registered by the ``airflow.plugins``
    entry point)."""

    name = "rubberband"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/rubberband", "name": "RubberBand"}]
    external_views = [{"name": "RubberBand", "href": "/rubberband/", "url_route": "rubberband", "destination": "nav",
                       "category": "browse"},
                      {"name": "RubberBand", "href": "/rubberband/runs/{DAG_ID}/{RUN_ID}",
                       "url_route": "rubberband_run", "destination": "dag_run"}]
