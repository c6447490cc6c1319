"""`make mwaa`: the Amazon MWAA bundle installs and its plugin loads in a clean environment.

MWAA's image is stood in for by a fresh virtual environment with apache-airflow of the targeted
version; the bundle's ``/usr/local/airflow/plugins/`` is the folder plugins.zip is unpacked into.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "dist" / "mwaa"
MWAA_PLUGINS = "/usr/local/airflow/plugins"

# The plugins Airflow registers (as `airflow plugins` lists them) and its plugin import errors.
PLUGINS = """
import json
from airflow.plugins_manager import get_import_errors, get_plugin_info
print(json.dumps({"plugins": [[p["name"], str(p["source"])] for p in get_plugin_info(["source"])],
                  "errors": get_import_errors()}))
"""


def _make(*args: str) -> subprocess.CompletedProcess:
    """``make`` in the repository, without remaking its virtual environment."""
    return subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_an_airflow_version_the_provider_does_not_support_is_refused():
    r = _make("mwaa", "AIRFLOW_VERSION=2.10.5")
    assert r.returncode != 0
    assert "AIRFLOW_VERSION: '2.10.5' is not a release the provider supports" in r.stderr


def test_the_bundle_installs_and_its_plugin_loads_once_in_a_clean_environment(tmp_path):
    r = _make("mwaa")
    assert r.returncode == 0, r.stderr[-3000:]
    # The wheel's build leaves nothing in the repository that reads as a second copy of the package.
    assert not (ROOT / "rubberband_airflow.egg-info").exists() and not (ROOT / "build").exists()
    plugins = tmp_path / "plugins"  # where MWAA unpacks plugins.zip
    with zipfile.ZipFile(BUNDLE / "plugins.zip") as z:
        z.extractall(plugins)
    [wheel] = [p.name for p in plugins.glob("rubberband_airflow-*.whl")]
    assert sorted(p.name for p in plugins.iterdir()) == ["constraints.txt", wheel, "rubberband_plugin.py"]
    assert (plugins / "constraints.txt").read_text().splitlines()[1:] == [
        "apache-airflow==3.3.2", "apache-airflow-providers-amazon==9.39.0"]
    requirements = (BUNDLE / "requirements.txt").read_text()
    assert requirements.splitlines() == [f"--constraint {MWAA_PLUGINS}/constraints.txt",
                                         f"{MWAA_PLUGINS}/{wheel}[airflow]"]
    (tmp_path / "requirements.txt").write_text(requirements.replace(MWAA_PLUGINS, str(plugins)))

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "home"), AIRFLOW__CORE__PLUGINS_FOLDER=str(plugins),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")

    def sh(*cmd: str | Path, **extra: str) -> str:
        r = subprocess.run([str(c) for c in cmd], env={**env, **extra}, capture_output=True, text=True, timeout=900,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    sh(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile"]
    sh(*pip, "apache-airflow==3.3.2")  # MWAA's image: Airflow installed before the requirements
    sh(*pip, "-r", tmp_path / "requirements.txt")
    # As on MWAA: the wheel's entry point registers the plugin, the folder's module adds none.
    sh(venv / "bin" / "python", "-c", "import rubberband_plugin, rubberband_airflow.plugin",
       PYTHONPATH=str(plugins))
    loaded = json.loads(sh(venv / "bin" / "python", "-c", PLUGINS).splitlines()[-1])  # after Airflow's log lines
    assert [name for name, _ in loaded["plugins"]] == ["rubberband"] and loaded["errors"] == {}
    assert loaded["plugins"][0][1].startswith("rubberband-airflow==")

    # The package importable without its entry point (its files on the path, no metadata):
    # the folder's module registers the plugin, once.
    site = tmp_path / "unregistered"
    sh(venv / "bin" / "python", "-m", "pip", "uninstall", "--quiet", "--yes", "rubberband-airflow")
    with zipfile.ZipFile(plugins / wheel) as z:
        z.extractall(site, [n for n in z.namelist() if n.startswith("rubberband_airflow/")])
    loaded = json.loads(sh(venv / "bin" / "python", "-c", PLUGINS, PYTHONPATH=str(site)).splitlines()[-1])
    assert loaded == {"plugins": [["rubberband", "$PLUGINS_FOLDER/rubberband_plugin.py"]], "errors": {}}
