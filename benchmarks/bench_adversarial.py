"""Adversarial outcome table (issue 11): how each backend ends on hard problems.

    python benchmarks/bench_adversarial.py [--draws 4] [--frameworks numpy jax torch]
        [--families ...] [--json FILE]

Draws `--draws` problems per family and parameter setting from `tests/adversarial.py` (badly
scaled, ill-conditioned, singular, stopped early, mixed dtype; seeded, so every run draws the
same problems), runs each on every framework (one decorated solver, one vector-Jacobian product
in a random direction) and counts the outcomes: correct / clear error / warned / silent wrong /
crash (a foreign exception type). "False alarm" counts the clear errors and warnings on problems
whose forward solution was exact to rounding and whose derivative keeps 10 digits (the scaled
ones, and the ill-conditioned ones up to cond 1e6): a refusal there is advice that cannot help.

The promise is silent wrong = 0 and crash = 0. The test `tests/test_fuzz_adversarial.py` asserts
it on hypothesis' deterministic draws in CI; this script prints the table of docs/failures.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from adversarial import OUTCOMES, classify
from adversarial import ill_conditioned as _ill
from adversarial import mixed_dtype as _mixed
from adversarial import scaled as _scaled
from adversarial import singular as _singular
from adversarial import stopped_early as _stopped

SETTINGS = {
    "scaled": [dict(decades=d) for d in (0.0, 4.0, 8.0, 10.0)],
    "ill-conditioned": [dict(log_cond=c, symmetric=s) for c in (2.0, 6.0, 10.0, 13.0)
                        for s in (False, True)],
    "singular": [dict(n=n, symmetric=s) for n in (5, 300) for s in (False, True)],
    "stopped early": [dict(steps=k, curvature=c) for k in (3, 20, 400)
                      for c in (1e-6, 1.0, 1e3)],
    "mixed dtype": [dict(steps64=k) for k in (3, 6, 10, 30, 200)],
}
MAKERS = {"scaled": _scaled, "ill-conditioned": _ill, "singular": _singular,
          "stopped early": _stopped, "mixed dtype": _mixed}


def _exact(family: str, params: dict) -> bool:
    """Whether the forward solution is exact to rounding and the derivative exists."""
    return family == "scaled" or (family == "ill-conditioned" and params["log_cond"] <= 6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--frameworks", nargs="+", default=["numpy", "jax", "torch"])
    ap.add_argument("--families", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    table: dict[tuple[str, str], Counter] = {}
    examples: list[dict] = []
    for family in args.families:
        for params in SETTINGS[family]:
            for draw in range(args.draws):
                seed = 1000 * draw + hash_params(family, params)
                case = MAKERS[family](np.random.default_rng(seed), **params)
                for fw in args.frameworks:
                    outcome, detail = classify(case, fw)
                    c = table.setdefault((family, fw), Counter())
                    c[outcome] += 1
                    if _exact(family, params) and outcome in ("clear error", "warned"):
                        c["false alarm"] += 1
                    if outcome in ("silent wrong", "crash") or args.verbose:
                        examples.append(dict(family=family, params=params, seed=seed, fw=fw,
                                             outcome=outcome, detail=detail))
    cols = [*OUTCOMES, "false alarm"]
    print("| family | framework | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    total: Counter = Counter()
    for (family, fw), c in table.items():
        total.update(c)
        print(f"| {family} | {fw} | " + " | ".join(str(c[k]) for k in cols) + " |")
    print("| **all** | | " + " | ".join(f"**{total[k]}**" for k in cols) + " |")
    for e in examples:
        print(f"- {e['outcome']}: {e['family']} {e['params']} seed {e['seed']} on {e['fw']}: "
              f"{e['detail']}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            table={f"{f}|{w}": dict(c) for (f, w), c in table.items()},
            total=dict(total), examples=examples), indent=1))


def hash_params(family: str, params: dict) -> int:
    """A stable seed offset per (family, params): the same problems on every run."""
    text = family + repr(sorted(params.items()))
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 997


if __name__ == "__main__":
    main()
