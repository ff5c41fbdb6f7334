"""docs/losses.md and the code agree: every signature the contract lists is the function's."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import qseg
import qseg.losses

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def listed_signatures() -> list[str]:
    """Every `name(...)` line of the contract's python blocks (imports left out)."""
    blocks = re.findall(r"```python\n(.*?)```", CONTRACT.read_text(), flags=re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"^[\w.]+\(.*\)$", line)]


def resolve(dotted: str):
    owner = qseg if dotted.startswith("qseg.") else qseg.losses
    for part in dotted.removeprefix("qseg.").split("."):
        owner = getattr(owner, part)
    return owner


def documented(line: str) -> list[tuple[str, str, object]]:
    """[(kind, name, default)] of a listed signature, parsed as a Python call's parameters."""
    call = ast.parse(f"def f{line[line.index('(') :]}: pass").body[0].args
    params = [("positional", a.arg, inspect.Parameter.empty) for a in call.args]
    defaults = [ast.literal_eval(d) for d in call.defaults]
    for i, value in enumerate(defaults, len(params) - len(defaults)):
        params[i] = (params[i][0], params[i][1], value)
    if call.vararg:
        params.append(("*args", call.vararg.arg, inspect.Parameter.empty))
    for arg, default in zip(call.kwonlyargs, call.kw_defaults, strict=True):
        value = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        params.append(("keyword", arg.arg, value))
    if call.kwarg:
        params.append(("**kwargs", call.kwarg.arg, inspect.Parameter.empty))
    return params


KINDS = {
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def actual(function) -> list[tuple[str, str, object]]:
    params = inspect.signature(function).parameters.values()
    return [(KINDS[p.kind], p.name, p.default) for p in params if p.name != "self"]


def test_the_contract_lists_the_public_api():
    names = {line.split("(")[0] for line in listed_signatures()}
    assert {"fused_linear_loss", "loss_from_logits", "FusedLinearLoss"} <= names
    assert {"qseg.patch_model", "qseg.unpatch_model"} <= names
    exported = set(qseg.losses.__all__) - {"ChunkPlan"}
    assert exported <= {name.split(".")[0] for name in names}, "an export the contract omits"


@pytest.mark.parametrize("line", listed_signatures(), ids=lambda line: line.split("(")[0])
def test_each_listed_signature_is_the_code(line):
    function = resolve(line.split("(")[0])
    target = function.__init__ if inspect.isclass(function) else function
    assert documented(line) == actual(target)
