"""What every settings model shares (pydantic only, for the CLI's fast start): unknown keys are refused,
numbers must be finite and within what numpy, torch and scikit-learn take, and the kinds of number that
several stages declare (seeds, steering multipliers) are declared once here. The same models validate
command-line options and study files, so both refuse the same values with the same words. A study file's
true/false is refused where a number is expected (pydantic would take it as 1 or 0), and text must be text
(no lone surrogates, which an undecodable command-line byte becomes) with something visible in it."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from adag.errors import has_visible, text_problem

LARGEST_INTEGER = 2**53  # every integer up to this converts exactly to int64 and float64
LARGEST_MULTIPLIER = 1000.0  # activations scaled further overflow float16 and bfloat16 models

# scikit-learn and numpy's legacy generators take seeds in [0, 2**32 - 1].
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Multiplier = Annotated[float, Field(ge=-LARGEST_MULTIPLIER, le=LARGEST_MULTIPLIER)]


class Settings(BaseModel):
    """Base of every stage's settings and options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers_and_text_is_text(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        for item in _numbers(value):
            if isinstance(item, bool) and not _accepts(annotation, bool) and _accepts(annotation, int, float):
                raise PydanticCustomError("bool_for_number", "{value} is true/false, not a number; give a number",
                                          {"value": str(item).lower()})
            if isinstance(item, str) and (problem := text_problem(item)):
                raise PydanticCustomError("not_text", "{problem}", {"problem": problem})
            if isinstance(item, str) and item and not has_visible(item):
                raise PydanticCustomError("invisible", "holds only whitespace or invisible characters (zero-width "
                                          "spaces, direction marks); give visible text")
        return value

    @field_validator("*")
    @classmethod
    def _integers_in_range(cls, value: Any) -> Any:
        for number in _numbers(value):
            if isinstance(number, int) and not isinstance(number, bool) and abs(number) > LARGEST_INTEGER:
                raise PydanticCustomError("too_large", "{number} is too large; give at most 2**53",
                                          {"number": number})
        return value


def _accepts(annotation: Any, *kinds: type) -> bool:
    """Whether a field's type takes values of one of `kinds` (looking inside unions, lists and Annotated)."""
    if annotation in kinds:
        return True
    return any(_accepts(argument, *kinds) for argument in typing.get_args(annotation))


def _numbers(value: Any) -> list:
    if isinstance(value, list | tuple):
        return [n for item in value for n in _numbers(item)]
    return [value]


def only_with(settings: BaseModel, condition: bool, needed: str, fields: tuple[str, ...]) -> None:
    """Refuse settings that take effect only with `needed` but were changed from their defaults without it
    (a contradiction the user should hear about rather than have ignored)."""
    if condition:
        return
    defaults = {name: type(settings).model_fields[name].get_default(call_default_factory=True) for name in fields}
    changed = [name for name in fields if getattr(settings, name) != defaults[name]]
    if changed:
        names = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise PydanticCustomError("contradiction", "without {needed}, {names} would be ignored; drop {names} or "
                                  "give {needed}", {"names": names, "needed": needed})
