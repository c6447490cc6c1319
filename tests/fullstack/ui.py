"""Drive the Airflow 3.3 web UI in a real (headless) Chromium: trigger a DAG run through its trigger
form, log in, open a run's plugin tab, choose the UI's color mode.

Needs the ``playwright`` Python package and a Chromium binary (Debian's ``chromium`` at
``/usr/bin/chromium`` by default, or ``$RUBBERBAND_CHROMIUM``); ``playwright install`` is not
needed. ``trigger_from_form`` logs the browser in by the UI's session cookie (``_token``) holding a
JWT that the caller got from ``POST /auth/token``; ``log_in`` by typing into the login form.

What the form does, as of Airflow 3.3: it sends *every* param in ``conf`` (the changed ones and the
defaults), a ``logical_date`` of the moment the form opened (to the second), and when the DAG is
paused it also unpauses it (a PATCH sent with the POST) unless its "Unpause ... on trigger" box is
cleared. On success it opens the new run's page.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Frame, Locator, Page, Response

CHROMIUM = os.environ.get("RUBBERBAND_CHROMIUM", "/usr/bin/chromium")
DEFAULT_SECTION = "Run Parameters"  # the form's accordion item for params without a ``section``


def param_fields(base_url: str, dag_id: str, token: str) -> dict[str, tuple[str, str]]:
    """Each param's (title, section) in the trigger form, from the DAG's details over REST."""
    url = f"{base_url}/api/v2/dags/{urllib.parse.quote(dag_id, safe='')}/details"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        params = json.loads(resp.read())["params"]
    return {name: (p["schema"].get("title") or name, p["schema"].get("section") or DEFAULT_SECTION)
            for name, p in params.items()}


def _field(dialog: Locator, title: str, section: str) -> Locator:
    """The input of the param titled ``title``, its accordion section opened first."""
    header = dialog.get_by_role("button", name=section, exact=True)
    if header.get_attribute("aria-expanded") != "true":  # one section open at a time
        header.click()
    # Its content, by id: not by role and name, as the region's aria-labelledby breaks on a space in the id.
    region = dialog.locator(f'[id="{header.get_attribute("aria-controls")}"]')
    # A required field's label reads "Title *"; match the title with or without the star.
    field = region.get_by_label(re.compile(rf"^\s*{re.escape(title)}\s*\*?\s*$"))
    field.wait_for(state="visible")
    return field


def _fill(field: Locator, value: object) -> None:
    """Type ``value`` into a field as a user would; numbers commit on blur."""
    if isinstance(value, bool):
        field.set_checked(value)
        return
    if isinstance(value, (list, tuple)):
        if field.evaluate("e => e.tagName") != "TEXTAREA":
            raise NotImplementedError(f"only one-per-line array fields can be filled, not {field}")
        text = "\n".join(str(v) for v in value)
    elif isinstance(value, (int, float, str)) or value is None:
        text = "" if value is None else str(value)
    else:
        raise NotImplementedError(f"cannot fill a form field with {value!r}")
    field.fill(text)
    field.blur()


def _shot(page: Page, screenshots: Path | None, name: str) -> None:
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


def trigger_from_form(base_url: str, dag_id: str, values: dict[str, object], token: str,
                      screenshots: Path | None = None, *, unpause: bool = True, timeout_s: float = 60.0,
                      chromium: str = CHROMIUM) -> str:
    """Trigger ``dag_id`` from its trigger form with ``values`` typed in (by param name), logged in with
    ``token``; returns the run id.

    Fields are found by their Param title inside their section; params not in ``values`` keep the
    form's defaults. ``unpause`` sets the form's "Unpause on trigger" box (shown only for a paused
    DAG). Raises if the UI's POST fails or the conf it sent does not hold ``values``.
    """
    from playwright.sync_api import sync_playwright

    fields = param_fields(base_url, dag_id, token)
    unknown = set(values) - set(fields)
    if unknown:
        raise KeyError(f"{dag_id} has no params {sorted(unknown)}; it has {sorted(fields)}")
    runs_path = f"/api/v2/dags/{dag_id}/dagRuns"
    dag_path = f"/api/v2/dags/{dag_id}"

    def is_post(r: Response) -> bool:
        return r.request.method == "POST" and urllib.parse.unquote(urllib.parse.urlsplit(r.url).path) == runs_path

    def is_unpause(r: Response) -> bool:
        return r.request.method == "PATCH" and urllib.parse.unquote(urllib.parse.urlsplit(r.url).path) == dag_path

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1400})
            context.add_cookies([{"name": "_token", "value": token, "url": base_url}])
            page = context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.goto(f"{base_url}/dags/{urllib.parse.quote(dag_id, safe='')}")
            page.get_by_role("button", name="Trigger Dag", exact=True).click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_role("button", name="Trigger", exact=True).wait_for()
            _shot(page, screenshots, "01-form")

            for name, value in values.items():
                _fill(_field(dialog, *fields[name]), value)
            box = dialog.get_by_role("checkbox", name=re.compile(r"^Unpause .* on trigger$"))
            unpausing = False
            if box.count():
                # The real input is visually hidden under Chakra's control: click its label instead.
                if box.is_checked() != unpause:
                    dialog.get_by_text(re.compile(r"^Unpause .* on trigger$")).click()
                    page.wait_for_function(f"e => e.checked === {json.dumps(unpause)}", arg=box.element_handle())
                unpausing = unpause
            advanced = dialog.get_by_role("button", name="Advanced Options", exact=True)
            if advanced.get_attribute("aria-expanded") != "true":
                advanced.click()  # shows the Configuration JSON the form will send, for the screenshot
            dialog.get_by_text("Configuration JSON").wait_for()
            _shot(page, screenshots, "02-filled")

            # The form sends its unpause (PATCH) alongside the POST: wait for it too, lest closing the browser drop it.
            with page.expect_response(is_unpause) if unpausing else contextlib.nullcontext():
                with page.expect_response(is_post) as posted:
                    dialog.get_by_role("button", name="Trigger", exact=True).click()
                resp = posted.value
                if not resp.ok:
                    _shot(page, screenshots, "03-failed")
                    raise RuntimeError(f"the form's trigger of {dag_id} failed: {resp.status} {resp.text()}")
                run = resp.json()
            # The form then opens the new run's page: wait for it to show the run id.
            page.wait_for_url(lambda url: urllib.parse.unquote(url).endswith(f"/runs/{run['dag_run_id']}"))
            page.get_by_text(run["dag_run_id"], exact=True).first.wait_for()
            _shot(page, screenshots, "03-submitted")
        finally:
            browser.close()

    sent: dict[str, Any] = run["conf"]
    wrong = {k: (v, sent.get(k)) for k, v in values.items() if sent.get(k) != (list(v) if isinstance(v, tuple) else v)}
    if wrong:
        raise AssertionError(f"the form sent other values than typed (typed, sent): {wrong}; conf {sent}")
    return run["dag_run_id"]


def log_in(page: Page, base_url: str, username: str, password: str) -> None:
    """Sign in on the Airflow UI's login page (the simple auth manager's form), as a user types it."""
    page.goto(f"{base_url}/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/" not in urllib.parse.urlsplit(url).path)


def open_run_tab(page: Page, base_url: str, dag_id: str, run_id: str, tab: str = "rubberband_run") -> Frame:
    """Open a DAG run's page and click its plugin tab ``tab`` (its ``url_route``); the tab's iframe."""
    page.goto(f"{base_url}/dags/{urllib.parse.quote(dag_id, safe='')}/runs/{urllib.parse.quote(run_id, safe='')}")
    page.locator(f'a[href$="/plugin/{tab}"]').click()
    frame = page.wait_for_selector("iframe").content_frame()
    assert frame is not None
    return frame


def set_appearance(page: Page, mode: str) -> None:
    """Choose the Airflow UI's color mode (``Light Mode``, ``Dark Mode``, ``Follow System Setting``) in
    its user menu."""
    page.get_by_role("button", name="User").click()
    page.get_by_role("menuitem", name="Appearance").click()
    page.get_by_role("menuitemradio", name=mode).click()
    page.keyboard.press("Escape")
