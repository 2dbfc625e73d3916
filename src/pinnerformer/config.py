"""Typed configuration, shared by every stage: a strict pydantic base and one way of reporting what is wrong.

Unknown keys are errors (a typo must not silently fall back to a default), and a value outside a fixed set of
choices says which value and which choices: "loss.objective: unknown objective 'sasrecc' (expected one of: …)".
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pinnerformer.errors import PinnerformerError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def merge_dicts(base: dict, over: dict) -> dict:
    """Nested dict update: `over` wins, sub-dicts merge."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe_validation_error(e: ValidationError) -> str:
    """pydantic's errors as one line each, located by their dotted key."""
    problems = []
    for err in e.errors():
        loc = ".".join(map(str, err["loc"]))
        if err["type"] == "literal_error":  # a choice: name the value and the choices
            choices = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            noun = next(str(x) for x in reversed(err["loc"]) if isinstance(x, str)).replace("_", " ")
            problems.append(f"{loc}: unknown {noun} {err['input']!r} (expected one of: {choices})")
        else:
            problems.append(f"{loc}: {err['msg']}")
    return "; ".join(problems)


def validate(model: type[M], raw: dict, what: str) -> M:
    """raw -> model, or a PinnerformerError that starts with `what` (a file, or the kind of options)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise PinnerformerError(f"{what}: {describe_validation_error(e)}") from None
