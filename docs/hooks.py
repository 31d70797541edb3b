"""MkDocs hooks: the tutorial's figures are made by the build, never by hand.

Before the pages are collected, every script in ``docs/tutorial/figures/`` runs in its own
interpreter (``python SCRIPT OUT_DIR``) and writes its PNGs into ``docs/tutorial/img/`` (ignored
by git: each build remakes them). A script that fails fails the build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_DOCS = Path(__file__).resolve().parent
FIGURES = _DOCS / "tutorial" / "figures"
IMG = _DOCS / "tutorial" / "img"


def make_figures(out: Path = IMG) -> list[Path]:
    """Run every figure script into ``out``; returns the scripts run, in order."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MPLBACKEND="Agg")
    scripts = sorted(p for p in FIGURES.glob("*.py") if not p.name.startswith("_"))
    for script in scripts:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{script.relative_to(_DOCS.parent)} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f"INFO    -  tutorial figures: {script.name} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return scripts


def on_pre_build(config: Any, **kwargs: Any) -> None:
    """MkDocs event: make the tutorial's figures before the pages are read."""
    make_figures()
