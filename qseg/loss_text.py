"""The one text form of a loss mixture: `cross_entropy:0.6,focal:0.4:gamma=3`.

Comma-separated terms `name[:weight][:param=value...]`; a term without a weight weighs 1.
`qseg train --loss` reads it, and run tables, benchmark rows and charts write it, so a
label can be pasted back into `--loss`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qseg.losses import normalize_losses


def parse_losses(text: str) -> dict[str, dict[str, Any]]:
    """Parse `--loss`: comma-separated `name[:weight][:param=value...]` or a JSON object.

    Examples: `focal`, `cross_entropy:0.6,lovasz:0.4`, `focal:1:gamma=3`,
    `lovasz:1:per_sample=true`, `{"focal": {"weight": 1, "gamma": 3}}`.
    A term without a weight weighs 1. Returns the losses normalized by
    `qseg.losses.normalize_losses`, which rejects unknown names and parameters.
    """
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            losses = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--loss {text!r} is not valid JSON: {err}") from err
        if not isinstance(losses, dict):
            raise ValueError(
                f"--loss {text!r}: JSON must be an object, name -> weight or name -> "
                '{"weight": w, **params}, e.g. {"focal": {"weight": 1, "gamma": 3}}'
            )
        return normalize_losses(losses)
    if not text:
        raise ValueError(
            "--loss is empty; give e.g. 'cross_entropy' or 'cross_entropy:0.6,lovasz:0.4'"
        )

    losses: dict[str, Any] = {}
    for term in text.split(","):
        name, *rest = [part.strip() for part in term.strip().split(":")]
        if not name:
            raise ValueError(
                f"--loss term {term!r} has no loss name (grammar: name[:weight][:param=value...])"
            )
        entry: dict[str, Any] = {}
        if rest and "=" not in rest[0]:
            entry["weight"] = _number(rest.pop(0), f"weight of {name!r} in --loss {text!r}")
        for param in rest:
            key, sep, value = param.partition("=")
            if not sep or not key:
                raise ValueError(
                    f"--loss term {term!r}: expected param=value after the weight, got {param!r}"
                )
            entry[key.strip()] = _scalar(value.strip())
        if name in losses:
            raise ValueError(f"loss {name!r} appears twice in --loss {text!r}")
        losses[name] = entry
    return normalize_losses(losses)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def _scalar(text: str) -> Any:
    """A parameter value: a number, true/false, or else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def format_losses(losses: str | Mapping[str, Any]) -> str:
    """The text form of `losses`, leaving out parameters at their default values.

    Args:
        losses: the canonical form of `qseg.losses.normalize_losses`, plain weights
            (`{"cross_entropy": 0.6}`), or a string, returned as it is.

    Returns:
        e.g. `"cross_entropy:0.6,focal:0.4:gamma=3"`.
    """
    if isinstance(losses, str):
        return losses
    terms = []
    for name, spec in losses.items():
        params = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
        parts = [name, _text(params.pop("weight", 1))]
        parts += [f"{key}={_text(value)}" for key, value in _changed_params(name, params).items()]
        terms.append(":".join(parts))
    return ",".join(terms)


def _changed_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` without those equal to the loss's defaults (all of them for an unknown loss)."""
    try:
        defaults = next(iter(normalize_losses({name: 1.0}).values()))
    except ValueError:
        return params
    return {key: value for key, value in params.items() if defaults.get(key) != value}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
