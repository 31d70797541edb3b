"""The `implicitdiff` command's entry: the argument parser and `main`, dispatching to `check`
(`_check.py`) and `demo` (`_demo.py`)."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from ._check import _cmd_check
from ._demo import _cmd_demo

_USER_FORMAT = """\
Problems. Each PROBLEM is either the name of a gallery problem (see --list) or MODULE:NAME:

  MODULE  an importable module (mypkg.layers; the current directory is on the path)
          or a path to a Python file (path/to/problem.py).
          WARNING: MODULE is imported, so its code runs with your permissions, exactly as
          `python path/to/problem.py` would. Check only code you trust.
  NAME    an attribute of MODULE, one of
          (a) a solver decorated with idf.custom_root / idf.custom_fixed_point, with example
              arguments in a sibling attribute NAME_args of MODULE (or an attribute
              `example_args` of the solver): a tuple of NumPy arrays / floats, or a
              zero-argument function returning one;
          (b) a zero-argument function returning (solver, args), solver decorated as in (a).

  Arguments may be pytrees (tuples, lists, dicts). Floating arrays and Python floats are
  converted to float64 in each framework (floats become 0-d arrays) and perturbed; integer,
  boolean and other leaves are passed through unchanged and get no derivative. Data that must
  stay fixed (a graph, the data a CVXPY problem was built with) is wrapped in
  implicitdiff.cli.Constant(...) or left out of --argnums. The solver must run on each backend
  checked (restrict them with --backends numpy). Host solvers (implicitdiff.scipy.wrap_solver,
  SciPy drop-ins via implicitdiff.scipy.implicit_function) need no result_shape: each backend's
  solver is called once with the example arguments first.

Rows. Each row compares one backend's jvp or vjp with finite differences (err vs FD) and with
  the NumPy reference (err vs ref; "ref bad" where the reference itself fails against finite
  differences or raised, and is then not counted). The status says what a row fails against:
  "FAIL vs FD", "FAIL vs ref", "FAIL vs FD+ref"; ERROR: the computation raised.

Example module:

  import numpy as np, implicitdiff as idf
  def F(x, theta): return x ** 3 + x - theta
  @idf.custom_root(F)
  def cubic(theta):  # Newton's method
      x = 0 * theta
      for _ in range(50): x = x - F(x, theta) / (3 * x ** 2 + 1)
      return x
  cubic_args = (np.linspace(-1.0, 1.0, 5),)
"""


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `implicitdiff` command."""
    parser = argparse.ArgumentParser(
        prog="implicitdiff",
        description="implicitdiff: implicit differentiation through any solver. "
                    "Cross-framework gradient checks and a demo.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"implicitdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    backends_help = ("comma-separated frameworks to run, from numpy,jax,torch (default: every "
                     "installed one; a framework counts as installed when it imports and so does "
                     "its implicitdiff backend)")

    check = sub.add_parser(
        "check", help="check implicit derivatives against finite differences and the NumPy "
                      "reference, in every framework",
        description=textwrap.fill(
                    "For each problem, backend and mode (jvp, vjp), in float64: the JVP in a "
                    "random direction v and the VJP of a random cotangent u, compared with "
                    "fourth-order central finite differences of the solver map θ ↦ x*(θ) along v "
                    "(JVP: ‖Jv − fd‖/‖fd‖; VJP: the dot-product test ⟨u, fd⟩ vs ⟨Jᵀu, v⟩) and "
                    "with the NumPy reference's JVP/VJP. Prints a table with the forward "
                    "residual and the backward linear-solve iterations (from "
                    "idf.diagnostics(); '-' where a backend records none). Exit status 0 when "
                    "every check passes, 1 when one fails, 2 on a usage error.", width=88),
        epilog=_USER_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("problems", nargs="*", metavar="PROBLEM",
                       help="gallery problem names or MODULE:NAME (below; MODULE's code is "
                            "executed); default: the gallery")
    check.add_argument("--backends", metavar="LIST", help=backends_help)
    check.add_argument("--rtol", type=_positive_float, default=1e-6,
                       help="tolerance of the relative error vs finite differences "
                            "(default 1e-6)")
    check.add_argument("--ref-rtol", type=_positive_float, default=1e-8,
                       help="tolerance of the relative error vs the NumPy reference "
                            "(default 1e-8)")
    check.add_argument("--step", type=_positive_float, default=1e-3,
                       help="finite-difference step along the random direction, relative to "
                            "each argument's size (default 1e-3)")
    check.add_argument("--argnums", metavar="LIST",
                       help="comma-separated positions of the solver's positional arguments to "
                            "perturb, e.g. 0,2 (default: every floating argument; the others are "
                            "held fixed, as are arguments wrapped in "
                            "implicitdiff.cli.Constant)")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the random directions (default 0)")
    check.add_argument("--list", action="store_true", help="list the gallery problems and exit")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser(
        "demo", help="tune a ridge penalty by hypergradient descent in every installed framework",
        description="Tunes the ridge penalty λ of a linear regression (scikit-learn's bundled "
                    "diabetes data with pairwise feature products; standardized; fixed "
                    "train/validation split) by Adam on s = log λ, the hypergradient of the "
                    "validation loss coming from idf.custom_root on the ridge optimality "
                    "condition. Runs in every installed framework (idf.vjp of the ridge solver "
                    "in the framework's arrays, the chain rule on the host), prints progress, "
                    "the final λ and validation RMSE per "
                    "framework, checks that the frameworks agree (exit status 1 if not) and "
                    "writes a plot of validation loss vs step.")
    demo.add_argument("--steps", type=int, default=60, help="optimization steps (default 60)")
    demo.add_argument("--out", default="implicitdiff-demo.png",
                      help="PNG file for the plot (default implicitdiff-demo.png)")
    demo.add_argument("--backends", metavar="LIST", help=backends_help)
    demo.add_argument("--lr", type=_positive_float, default=0.3,
                      help="Adam step size in log λ (default 0.3)")
    demo.add_argument("--lam0", type=_positive_float, default=1e-4,
                      help="initial ridge penalty (default 1e-4)")
    demo.add_argument("--agree-rtol", type=_positive_float, default=1e-6,
                      help="largest relative difference allowed between frameworks "
                           "(default 1e-6)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `implicitdiff` command with `argv` (default `sys.argv[1:]`); return the exit
    status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    return int(ns.func(ns))
