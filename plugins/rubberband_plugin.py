"""The RubberBand UI plugin for Airflow installations that load plugins from a folder.

Amazon MWAA unpacks ``plugins.zip`` into its plugins folder and ``docker/compose.yaml`` mounts
this folder at ``/opt/airflow/plugins``. Airflow loads the plugins folder before the
``airflow.plugins`` entry points and records a second plugin of the same name as an import
error, so this module exposes ``RubberBandPlugin`` only where the installed package does not
register it through its entry point (the package importable without its metadata); where the
package is installed, its entry point registers the plugin and this module adds nothing.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT = "rubberband_airflow.plugin:RubberBandPlugin"


def registered_by_entry_point() -> bool:
    """Whether an installed distribution registers the plugin in the ``airflow.plugins`` group."""
    return any(ep.value == ENTRY_POINT for ep in entry_points(group="airflow.plugins"))


if not registered_by_entry_point():
    from rubberband_airflow.plugin import RubberBandPlugin

    __all__ = ["RubberBandPlugin"]
