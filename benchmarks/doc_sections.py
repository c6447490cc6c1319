"""docs/benchmarks.md is made of sections, each written by one benchmark script."""

from __future__ import annotations

import re
from pathlib import Path

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
