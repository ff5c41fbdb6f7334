"""Loss names, aliases and parameters, and the parsing of loss mixtures.

A mixture is what users write (`"focal"`, `{"cross_entropy": 0.6, "lovasz": 0.4}` or
`{"focal": {"weight": 1.0, "gamma": 3.0}}`); `normalize_losses` turns it into one form,
`{canonical_name: {"weight": w, **params}}`, with every parameter filled in and checked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

LossKind = Literal["token", "region"]


@dataclass(frozen=True)
class LossDef:
    """One loss: its canonical name, kind, parameters with defaults, and aliases.

    Token-wise losses depend on each token's own logits only; region losses depend on
    class statistics of a whole sample or batch. `optional` parameters appear in a
    normalized mixture only when they differ from their default, so that the forms
    saved before they existed stay the canonical ones.
    """

    name: str
    kind: LossKind
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    optional: dict[str, Any] = field(default_factory=dict)


LOSSES: dict[str, LossDef] = {
    d.name: d
    for d in (
        LossDef("cross_entropy", "token", aliases=("ce",), optional={"label_smoothing": 0.0}),
        LossDef("focal", "token", {"gamma": 2.0}),
        LossDef(
            "self_adjusting_dice",
            "token",
            {"alpha": 1.0, "gamma": 1.0},
            aliases=("sadl", "self_adj_dice"),
        ),
        LossDef(
            "generalized_dice",
            "region",
            {"smooth": 1e-5, "absent_weight": "max"},
            aliases=("gdice",),
        ),
        LossDef("tversky", "region", {"alpha": 0.3, "beta": 0.7, "smooth": 1e-5}),
        LossDef("dice", "region", {"smooth": 1e-5}),
        LossDef("jaccard", "region", {"smooth": 1e-5}, aliases=("iou",)),
        LossDef("lovasz", "region", {"per_sample": False}),
        LossDef("z_loss", "token", aliases=("zloss",)),
    )
}

ABSENT_WEIGHTS = ("max", "reference", "zero")
# Parameters that are fractions, with their upper bound.
AT_MOST_ONE = ("label_smoothing",)

_ALIASES = {alias: d.name for d in LOSSES.values() for alias in (d.name, *d.aliases)}


def available_losses() -> list[str]:
    """The canonical loss names, in the order of the spec."""
    return list(LOSSES)


def canonical_name(name: str) -> str:
    """Resolve an alias (`"ce"`, `"gdice"`, ...) to its canonical name."""
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        allowed = ", ".join(
            f"{d.name} ({', '.join(d.aliases)})" if d.aliases else d.name for d in LOSSES.values()
        )
        raise ValueError(f"unknown loss {name!r}; available losses (aliases): {allowed}")
    return _ALIASES[name.lower()]


def loss_kind(name: str) -> LossKind:
    """Whether a loss (name or alias) is token-wise ("token") or a region loss ("region")."""
    return LOSSES[canonical_name(name)].kind


def normalize_losses(losses: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn any accepted mixture form into `{canonical_name: {"weight": w, **params}}`.

    Raises:
        ValueError: unknown names or parameters, bad parameter values, negative or
            non-finite weights, an empty mixture, or the same loss named twice.
    """
    if isinstance(losses, str):
        losses = {losses: 1.0}
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            f"losses must be a loss name or a non-empty dict name -> weight or "
            f"name -> {{'weight': w, **params}}; got {losses!r}"
        )
    mixture: dict[str, dict[str, Any]] = {}
    for raw_name, entry in losses.items():
        name = canonical_name(raw_name)
        if name in mixture:
            raise ValueError(f"loss {name!r} appears twice in the mixture (as {raw_name!r})")
        if isinstance(entry, Mapping):
            params = dict(entry)
            weight = params.pop("weight", 1.0)
        else:
            params, weight = {}, entry
        mixture[name] = {"weight": _check_weight(name, weight), **_check_params(name, params)}
    return mixture


def _is_real(value: Any) -> bool:
    """A real number (numpy's scalars included); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_weight(name: str, weight: Any) -> float:
    if not _is_real(weight):
        raise ValueError(f"weight of {name!r} must be a number >= 0; got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight of {name!r} must be finite and >= 0; got {weight!r}")
    return float(weight)


def _check_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    optional = LOSSES[name].optional
    defaults = {**LOSSES[name].defaults, **optional}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for loss {name!r}; "
            f"allowed parameters (defaults): weight=1.0, {allowed}"
        )
    checked = dict(LOSSES[name].defaults)
    for key, value in params.items():
        default = defaults[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name}.{key} must be true or false; got {value!r}")
        elif isinstance(default, str):
            if value not in ABSENT_WEIGHTS:
                raise ValueError(
                    f"{name}.{key} must be one of {', '.join(ABSENT_WEIGHTS)}; got {value!r}"
                )
        elif not _is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}.{key} must be a finite number >= 0; got {value!r}")
        elif key in AT_MOST_ONE and value > 1:
            raise ValueError(f"{name}.{key} must be in [0, 1]; got {value!r}")
        else:
            value = float(value)
        if key not in optional or value != optional[key]:
            checked[key] = value
    return checked


def split_by_kind(
    mixture: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Split a normalized mixture into its token-wise and region parts."""
    token = {n: p for n, p in mixture.items() if LOSSES[n].kind == "token"}
    region = {n: p for n, p in mixture.items() if LOSSES[n].kind == "region"}
    return token, region
