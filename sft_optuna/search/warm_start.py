"""A warm start: the best configurations of an earlier study, projected into a new study's search space.

``sft-optuna create FILE --warm-start OTHER --top K`` puts the K best completed configurations of study OTHER (in
the same storage) at the head of the new study's budget: its first K slots are queued with those parameters
(tagged ``warm_start_from``), so that the first trials run recipes known to be good on related data while the
sampler learns the new study's own landscape from them. A parameter whose value does not fit the new space (out
of range, off its step, not among its choices, or not searched here) is left for the sampler to choose, and
named in the log; a study whose space shares no parameter with OTHER's is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sft_optuna.config import ParamSpec
from sft_optuna.errors import UserError

__all__ = ["WarmStart", "fits", "project", "warm_start_points"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStart:
    """One configuration to queue: its parameters in the new space, and where it came from."""

    params: dict[str, Any]
    source: str
    """``STUDY#N``: the study and trial it came from (the ``warm_start_from`` attribute)."""
    dropped: tuple[str, ...]
    """The source trial's parameters left for the sampler, each with why."""


def fits(value: Any, spec: ParamSpec) -> str | None:
    """None if ``value`` is a value ``spec`` can take; else why not (for the log)."""
    if spec.type == "categorical":
        assert spec.choices is not None
        kind = lambda v: (isinstance(v, bool), isinstance(v, str))  # noqa: E731 - 64 is 64.0, but True is not 1
        same = any(c == value and kind(c) == kind(value) for c in spec.choices)
        return None if same else f"{value!r} is not among the choices {spec.choices}"
    if not _number(value):
        return f"{value!r} is not a number"
    assert spec.low is not None and spec.high is not None
    if not spec.low <= value <= spec.high:
        return f"{value!r} is outside [{spec.low:g}, {spec.high:g}]"
    if spec.type == "int" and float(value) != int(value):
        return f"{value!r} is not a whole number"
    if spec.step is not None:
        k = (value - spec.low) / spec.step
        if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
            return f"{value!r} is off the step {spec.step:g} from {spec.low:g}"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def project(params: dict[str, Any], space: dict[str, ParamSpec]) -> tuple[dict[str, Any], list[str]]:
    """``params`` (another study's trial) in ``space``: the values it can take, and each left out with why."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in params.items():
        spec = space.get(name)
        why = "not searched in this study" if spec is None else fits(value, spec)
        if why is None:
            assert spec is not None
            kept[name] = int(value) if spec.type == "int" else value
        else:
            dropped.append(f"{name} ({why})")
    return kept, dropped


def warm_start_points(
    trials: Sequence[FrozenTrial], other: str, other_space: dict[str, ParamSpec], space: dict[str, ParamSpec], top: int
) -> list[WarmStart]:
    """The ``top`` best completed configurations of study ``other`` (its ``trials``), projected into ``space``,
    best first and each once. A :class:`UserError` (one line) when nothing can be carried over."""
    shared = sorted(set(other_space) & set(space))
    if not shared:
        raise UserError(
            f"--warm-start {other}: no parameter of its search space ({', '.join(sorted(other_space)) or 'none'}) "
            f"is searched in this study ({', '.join(sorted(space)) or 'none'}); nothing to carry over"
        )
    completed = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not completed:
        raise UserError(f"--warm-start {other}: the study has no completed trial to start from")
    out: list[WarmStart] = []
    seen: set[str] = set()
    for t in sorted(completed, key=lambda t: (-float(t.value), t.number)):  # type: ignore[arg-type]
        kept, dropped = project(t.params, space)
        key = repr(sorted(kept.items()))
        if not kept or key in seen:
            continue
        seen.add(key)
        out.append(WarmStart(kept, f"{other}#{t.number}", tuple(dropped)))
        if len(out) == top:
            break
    return out
