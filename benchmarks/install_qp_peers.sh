#!/usr/bin/env bash
# Install the peers of benchmarks/bench_qp.py (QP layers) into the current Python environment.
#
#     bash benchmarks/install_qp_peers.sh                 # uses `python -m pip`
#     PYTHON=.venv/bin/python bash benchmarks/install_qp_peers.sh
#
# Peers: cvxpylayers 1.2.0 (torch and JAX interfaces; pulls cvxpy, diffcp, scs, clarabel, osqp),
# qpax 0.1.4 (JAX), proxsuite 0.8.0 (its QPLayer is a torch.autograd.Function), qpth 0.0.18
# (torch).
#
# qpth 0.0.18 is PATCHED here: its published metadata pins `numpy>=1,<2`. A plain
# `pip install -c constraints.txt qpth==0.0.18` into an environment with NumPy 2.4 resolves by
# DOWNGRADING NumPy to 1.26.4 and cvxpy to 1.7.5 (`pip install --dry-run` says "Would install ...
# cvxpy-1.7.5 ... numpy-1.26.4 ... qpth-0.0.18"), which breaks the NumPy-2 builds of jax, scipy
# and torch beside it. This script downloads the sdist, deletes the `<2` bound from setup.py and
# the egg-info, and installs it with `--no-deps --no-build-isolation`. qpth's code runs unchanged with NumPy 2 and torch 2.13 for the
# batched PDIPM solver the benchmark uses (it only touches NumPy in its CVXPY solver path).
#
# Always pass constraints.txt (when present) so torch stays the pinned CPU build; none of these
# peers requires a torch or jax version of its own, so no --no-deps is needed for them.
set -euo pipefail
PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CONSTRAINTS=()
if [[ -f "$ROOT/constraints.txt" ]]; then CONSTRAINTS=(-c "$ROOT/constraints.txt"); fi

"$PYTHON" -m pip install "${CONSTRAINTS[@]}" \
    "cvxpy==1.9.3" "cvxpylayers==1.2.0" "diffcp==1.1.9" "qpax==0.1.4" "proxsuite==0.8.0"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --no-deps --no-binary :all: "qpth==0.0.18" -d "$WORK"
tar -xzf "$WORK/qpth-0.0.18.tar.gz" -C "$WORK"
SRC="$WORK/qpth-0.0.18"
sed -i.bak "s/'numpy>=1,<2'/'numpy>=1'/" "$SRC/setup.py"
sed -i.bak 's/numpy<2,>=1/numpy>=1/; s/numpy>=1,<2/numpy>=1/' "$SRC/qpth.egg-info/requires.txt" "$SRC/PKG-INFO"
if grep -q "numpy.*<2" "$SRC/setup.py"; then echo "qpth patch failed: numpy<2 still in setup.py" >&2; exit 1; fi
"$PYTHON" -m pip install "${CONSTRAINTS[@]}" --no-deps --no-build-isolation "$SRC"

"$PYTHON" - <<'EOF'
import importlib.metadata as md
for name in ("qpth", "cvxpylayers", "cvxpy", "diffcp", "qpax", "proxsuite", "torch", "jax", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
EOF
