"""The `implicitdiff` command: `implicitdiff check` and `implicitdiff demo`.

`check` verifies implicit derivatives across frameworks against central finite differences and the
NumPy reference (`_check.py`); `demo` tunes a ridge penalty by hypergradient descent in every
installed framework (`_demo.py`); `_main.py` holds the argument parser and `main`; `_common.py`
what both need of the frameworks. Frameworks are imported only when a subcommand needs them.
"""

from ._check import CheckReport as CheckReport
from ._check import Constant as Constant
from ._check import Row as Row
from ._check import check as check
from ._check import check_problem as check_problem
from ._check import load_problem as load_problem
from ._check import run_check as run_check
from ._common import FRAMEWORKS as FRAMEWORKS
from ._common import backend_status as backend_status
from ._common import installed_backends as installed_backends
from ._common import to_numpy as to_numpy
from ._demo import DemoRun as DemoRun
from ._demo import load_data as load_data
from ._demo import make_hypergradient as make_hypergradient
from ._demo import ridge_fit as ridge_fit
from ._main import build_parser as build_parser
from ._main import main as main

__all__ = [
    "FRAMEWORKS",
    "CheckReport",
    "Constant",
    "DemoRun",
    "Row",
    "backend_status",
    "build_parser",
    "check",
    "check_problem",
    "installed_backends",
    "load_data",
    "load_problem",
    "main",
    "make_hypergradient",
    "ridge_fit",
    "run_check",
    "to_numpy",
]
