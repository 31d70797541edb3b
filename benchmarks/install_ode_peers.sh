#!/usr/bin/env bash
# Install the peers of benchmarks/bench_ode.py (Neural ODEs) into a Python environment.
#
#     bash benchmarks/install_ode_peers.sh                 # uses `python -m pip`
#     PYTHON=.venv/bin/python bash benchmarks/install_ode_peers.sh
#
# Peers: torchdiffeq 0.2.5 and torchode 1.0.1 (PyTorch), diffrax 0.7.2 (JAX; pulls lineax and
# optimistix, needs equinox). torchode also pulls torchtyping 0.1.5 and typeguard 2.13.3.
#
# Always pass constraints.txt (when present) so torch stays the pinned CPU build. torch, jax and
# jaxlib are pinned to the versions already installed (when they are), so that resolving
# diffrax's or torchode's requirements can never up- or downgrade them.
set -euo pipefail
PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CONSTRAINTS=()
if [[ -f "$ROOT/constraints.txt" ]]; then CONSTRAINTS=(-c "$ROOT/constraints.txt"); fi

PINS=()
for name in torch jax jaxlib; do
    v="$("$PYTHON" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]).split('+')[0])
except m.PackageNotFoundError:
    pass" "$name")"
    if [[ -n "$v" ]]; then PINS+=("$name==$v"); fi
done

"$PYTHON" -m pip install "${CONSTRAINTS[@]}" \
    "torchdiffeq==0.2.5" "torchode==1.0.1" "diffrax==0.7.2" "${PINS[@]}"

"$PYTHON" - <<'EOF'
import importlib.metadata as md
for name in ("torchdiffeq", "torchode", "diffrax", "equinox", "lineax", "optimistix", "torch",
             "jax", "jaxlib", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
EOF
