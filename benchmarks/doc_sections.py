"""docs/benchmarks.md is made of sections, each written by one benchmark script."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEach section is written by a script in `benchmarks/`; raw numbers are in "
          "`benchmarks/results/`.\n")


def write_section(name: str, markdown: str) -> None:
    """Replace (or add) the section ``name`` of docs/benchmarks.md, keeping the others."""
    text = DOC.read_text() if DOC.exists() else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    block = f"<!-- section:{name} -->\n{markdown.strip()}\n<!-- /section:{name} -->"
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def save_results(path: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Write a benchmark's runs to ``path`` (JSON), with the machine and its load at the end; returns them."""
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}",
              "load_average": os.getloadavg()[0], "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path.relative_to(DOC.parents[1]), file=sys.stderr)
    return result
