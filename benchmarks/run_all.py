"""Run every benchmark and rewrite the tables of BENCHMARKS.md: `make bench` (python benchmarks/run_all.py).

The prose of BENCHMARKS.md stays; each section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is
replaced by that benchmark's fresh output, with the command, the date and the machine.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import clip  # noqa: E402
import doctor  # noqa: E402
import foreach  # noqa: E402
import integrations  # noqa: E402
import models  # noqa: E402
import monitor  # noqa: E402
import norm  # noqa: E402
import probe  # noqa: E402

BENCHMARKS = {
    "clip": clip,
    "norm": norm,
    "monitor": monitor,
    "models": models,
    "foreach": foreach,
    "probe": probe,
    "doctor": doctor,
    "integrations": integrations,
}
DOC = HERE.parent / "BENCHMARKS.md"


def run(name: str, module) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main()
    output = buffer.getvalue().rstrip()
    print(output + "\n")
    today = datetime.date.today().isoformat()
    header = f"Command: `.venv/bin/python benchmarks/{name}.py` ({today}, via `benchmarks/run_all.py`)"
    return f"{header}\n\n```\n{output}\n```"


def main() -> None:
    text = DOC.read_text()
    chosen = sys.argv[1:] or list(BENCHMARKS)  # e.g. `run_all.py integrations` rewrites that section only
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in chosen:
        module = BENCHMARKS[name]
        block = run(name, module)
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        replacement = f"<!-- bench:{name} -->\n{block}\n<!-- /bench:{name} -->"
        if pattern.search(text):
            text = pattern.sub(lambda _, fresh=replacement: fresh, text)
        else:
            text += f"\n## {name}\n\n{replacement}\n"
    DOC.write_text(text)
    print(f"Rewrote {DOC}")


if __name__ == "__main__":
    main()
