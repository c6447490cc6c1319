"""The RubberBand tab of a DAG run, in Airflow's own UI on the full stack: a user logs in, opens a run's
page and clicks the tab, in flight and once finished; headless Chromium checks every chart of the
view in the tab's iframe against the run's files and report, in Airflow's light and dark modes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from rubberband_airflow.execution.storage import RunStorage
from tests.fullstack.conftest import run_folder
from tests.fullstack.ui import CHROMIUM, log_in, open_run_tab, set_appearance
from tests.run_view_dom import (
    RunState,
    View,
    check_common,
    check_finished,
    check_in_flight,
    check_theme,
    read_view,
    wait_drawn,
)

if TYPE_CHECKING:
    from playwright.sync_api import Frame, Page

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} "
                                "(scripts/install-test-tools.sh)")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"{what} within {timeout:g} s")
        time.sleep(1)


def _drawn(frame: Frame, theme: str, shot: Path, page: Page) -> View:
    wait_drawn(frame, theme)
    view = read_view(frame)
    page.screenshot(path=str(shot), full_page=True)
    return view


def test_the_run_tab_in_airflows_ui_in_flight_and_finished(airflow_stack, digits_rest_run, tmp_path):
    from playwright.sync_api import sync_playwright

    stack, run_id = airflow_stack, digits_rest_run
    storage = RunStorage(f"file://{stack.home}/rubberband/digits_tuning/{run_folder(run_id)}")
    # In flight: a trial of stage 1 has trained an epoch (of the 3 stages the run has).
    _wait(lambda: any(storage.metrics(t) for t in storage.subfolders("trials")), "no trial trained an epoch")

    errors: list[str] = []  # the view's (the tab's iframe's) console errors; Airflow's own are not ours to judge
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, color_scheme="light")
            page.set_default_timeout(60_000)
            page.on("console", lambda m: errors.append(f"{m.location.get('url')}: {m.text}")
                    if m.type == "error" and "/rubberband/" in (m.location.get("url") or "") else None)
            log_in(page, stack.base, "admin", stack.password)

            before = RunState.read(storage)
            frame = open_run_tab(page, stack.base, "digits_tuning", run_id)
            in_flight = _drawn(frame, "light", tmp_path / "tab-in-flight.png", page)
            assert stack.api("GET", f"/dags/digits_tuning/dagRuns/{run_id}")["state"] == "running", \
                "the run ended before its tab was read in flight"
            check_in_flight(in_flight, before)
            check_theme(in_flight, dark=False)
            # It reads the run again by itself, some seconds after it drew it.
            before = RunState.read(storage)
            with frame.expect_navigation(timeout=60_000):
                pass
            check_common(_drawn(frame, "light", tmp_path / "tab-in-flight-2.png", page), before)

            assert stack.wait_for_run("digits_tuning", run_id) == "success"
            frame = open_run_tab(page, stack.base, "digits_tuning", run_id)
            finished = _drawn(frame, "light", tmp_path / "tab-finished-light.png", page)
            check_finished(finished, RunState.read(storage))
            check_theme(finished, dark=False)

            # Airflow's own color mode, chosen in its user menu, is the tab's (the browser stays light).
            set_appearance(page, "Dark Mode")
            dark = _drawn(frame, "dark", tmp_path / "tab-finished-dark.png", page)
            check_theme(dark, dark=True)
            check_finished(dark, RunState.read(storage))
        finally:
            browser.close()
    assert errors == []
