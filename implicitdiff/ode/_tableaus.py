"""Butcher tableaus of the built-in explicit Runge–Kutta methods.

A method with $s$ stages advances $y' = f(t, y)$ from $(t, y)$ by a step $h$:

$$k_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} k_j\\Big), \\qquad
y_{\\text{next}} = y + h \\sum_i b_i k_i,$$

and an embedded pair estimates the local error as $h \\sum_i e_i k_i$ with $e = b - \\hat b$.
The coefficients are plain Python floats (the published rational values where there are
some), shared by every framework. `tests/test_ode.py` checks them against the order conditions
(one per rooted tree, up to the method's order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    **Fields:**

    - `name`: the method's name, as `odeint(method=...)` takes it.
    - `c`: the nodes $c_i$ (length $s$, $c_1 = 0$).
    - `a`: the rows $a_{i,1..i-1}$ of the strictly lower triangular matrix (length $s$, the
      first row empty).
    - `b`: the weights of the solution $b_i$.
    - `b_error`: $e = b - \\hat b$, the weights of the embedded error estimate; None for a
      fixed-step method.
    - `order`: the order of the solution ($b$).
    - `error_order`: the order of the embedded solution ($\\hat b$); 0 without one.
    - `fsal`: first same as last: the last stage is evaluated at $(t + h, y_{\\text{next}})$,
      so it is the first stage of the next step (one evaluation of $f$ saved per step).
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None
    order: int
    error_order: int = 0
    fsal: bool = False

    @property
    def stages(self) -> int:
        """The number of stages $s$."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimate (adaptive steps)."""
        return self.b_error is not None


EULER = ButcherTableau(name="euler", c=(0.0,), a=((),), b=(1.0,), b_error=None, order=1)
"""The explicit Euler method (order 1, fixed step)."""

RK4 = ButcherTableau(
    name="rk4",
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    b_error=None,
    order=4,
)
"""The classical Runge–Kutta method (order 4, fixed step)."""

_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_BHAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_error=tuple(b - bh for b, bh in zip(_DOPRI5_B, _DOPRI5_BHAT)),
    order=5,
    error_order=4,
    fsal=True,
)
"""Dormand–Prince 5(4) (Dormand & Prince 1980): 7 stages, FSAL, adaptive."""

# Tsitouras 2011, "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Table 1 (the values are the paper's, to double precision).
_TSIT5_A = (
    (),
    (0.161,),
    (-0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
     0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569),
    (2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
     -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
     4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077),
    (5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
     -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
     7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
     -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635),
    (5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
     -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
     8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
     -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
     -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206),
    (0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
     0.01,
     0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
     1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
     -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
     2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841),
)
_TSIT5_B = (*_TSIT5_A[6], 0.0)
_TSIT5_BHAT = (
    0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
    0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
    0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
    1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
    -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
    1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
    1 / 66,
)

TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9,
       0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604,
       1.0, 1.0),
    a=_TSIT5_A,
    b=_TSIT5_B,
    b_error=tuple(b - bh for b, bh in zip(_TSIT5_B, _TSIT5_BHAT)),
    order=5,
    error_order=4,
    fsal=True,
)
"""Tsitouras 5(4) (Tsitouras 2011): 7 stages, FSAL, adaptive; the default of `odeint`."""

TABLEAUS: dict[str, ButcherTableau] = {t.name: t for t in (EULER, RK4, DOPRI5, TSIT5)}
"""The built-in methods by name."""


def tableau(method: str | ButcherTableau) -> ButcherTableau:
    """The `ButcherTableau` named `method` (or `method` itself when it is one).

    Raises `ValueError` for an unknown name, listing the known ones."""
    if isinstance(method, ButcherTableau):
        return method
    try:
        return TABLEAUS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"odeint: expected method one of {sorted(TABLEAUS)} or a ButcherTableau, got "
            f"{method!r}."
        ) from None
