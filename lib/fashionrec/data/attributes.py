"""A catalog's attribute columns (colour, gender, price...): filters over them and their JSON form.

A filter is written ``column=value``; several values separated by commas mean "any of them";
a numeric column also takes an inclusive range ``low..high`` (either end may be left out):

    colour=Red              equality (text is compared stripped and case-insensitively)
    colour=Red,Blue         any of the values
    price=10..50            10 <= price <= 50 (numeric columns only); price=..50, price=10..
    size=38                 a numeric column compares numbers: 38 equals 38.0

Several filters must all hold. An item missing the value never passes. A column the
catalog does not have, a range over text, or values no item has are errors naming the
column and what it holds, so a typo is never an empty answer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import FashionRecError, did_you_mean

RANGE_SEPARATOR = ".."
SHOWN_VALUES = 12


@dataclass(frozen=True)
class AttributeFilter:
    """``column`` holds one of ``values``, or lies in [``low``, ``high``] (None: unbounded)."""

    column: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return not self.values

    def __str__(self) -> str:
        if self.is_range:
            low = "" if self.low is None else f"{self.low:g}"
            high = "" if self.high is None else f"{self.high:g}"
            return f"{self.column}={low}{RANGE_SEPARATOR}{high}"
        return f"{self.column}={','.join(map(str, self.values))}"


def parse_filter(text: str) -> AttributeFilter:
    """``"colour=Red,Blue"`` / ``"price=10..50"`` -> an :class:`AttributeFilter` (see the module docstring)."""
    column, separator, value = str(text).partition("=")
    column, value = column.strip(), value.strip()
    if not separator or not column or not value:
        raise FashionRecError(f"--filter {text!r}: write column=value, column=a,b (any of them) or "
                              f"column=low..high (numbers), e.g. colour=Red or price=10..50")
    if RANGE_SEPARATOR in value and "," not in value:
        low, _, high = value.partition(RANGE_SEPARATOR)
        bounds = [_number(part, text) if part.strip() else None for part in (low, high)]
        if bounds == [None, None]:
            raise FashionRecError(f"--filter {text!r}: a range needs at least one end, e.g. {column}=10..50")
        if None not in bounds and bounds[0] > bounds[1]:
            raise FashionRecError(f"--filter {text!r}: the range is empty ({bounds[0]:g} > {bounds[1]:g})")
        return AttributeFilter(column, (), *bounds)
    values = tuple(part.strip() for part in value.split(",") if part.strip())
    if not values:
        raise FashionRecError(f"--filter {text!r}: no value after '='")
    return AttributeFilter(column, values)


def as_filters(filters) -> list[AttributeFilter]:
    """Filters given as strings (``"colour=Red"``), AttributeFilter objects or a mapping column -> value.

    A mapping's value is one value, a list of values (any of them) or a ``(low, high)`` tuple
    of numbers (a range, None for an open end).
    """
    if filters is None:
        return []
    if isinstance(filters, (str, AttributeFilter)):
        filters = [filters]
    if isinstance(filters, Mapping):
        parsed = []
        for column, value in filters.items():
            if isinstance(value, tuple) and len(value) == 2:
                parsed.append(AttributeFilter(str(column), (), *(None if end is None else float(end)
                                                                 for end in value)))
            else:
                values = value if isinstance(value, (list, set, frozenset)) else [value]
                parsed.append(AttributeFilter(str(column), tuple(str(v) for v in values)))
        return parsed
    return [item if isinstance(item, AttributeFilter) else parse_filter(item) for item in filters]


def filter_mask(table: pd.DataFrame, filters, columns) -> np.ndarray | None:
    """Bool per row of ``table``: every filter holds; None when there are no filters.

    ``columns``: the attribute columns a filter may name (the others, e.g. ``path``, are not attributes).
    """
    filters = as_filters(filters)
    if not filters:
        return None
    columns = list(columns)
    mask = np.ones(len(table), dtype=bool)
    for condition in filters:
        if condition.column not in columns:
            listed = ", ".join(columns) if columns else "none"
            raise FashionRecError(f"--filter {condition}: no attribute {condition.column!r}"
                                  f"{did_you_mean(condition.column, columns)}; this index's attributes: {listed}")
        mask &= _holds(table[condition.column], condition)
    return mask


def _holds(column: pd.Series, condition: AttributeFilter) -> np.ndarray:
    if is_numeric(column):
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
        present = ~np.isnan(numbers)
        if condition.is_range:
            low = -math.inf if condition.low is None else condition.low
            high = math.inf if condition.high is None else condition.high
            return present & (numbers >= low) & (numbers <= high)
        wanted = np.array([_number(value, str(condition)) for value in condition.values])
        held = np.isin(numbers, wanted) & present
        _check_values_exist(condition, wanted[~np.isin(wanted, numbers[present])],
                            sorted(set(numbers[present].tolist())))
        return held
    if condition.is_range:
        raise FashionRecError(f"--filter {condition}: {condition.column!r} holds text, not numbers; a range "
                              f"(low..high) needs a numeric column (use {condition.column}=a,b for any of a, b)")
    text = column.astype("string").str.strip().str.casefold()
    wanted = [value.casefold() for value in condition.values]
    held = text.isin(wanted).fillna(False).to_numpy(dtype=bool)
    present = set(text.dropna())
    _check_values_exist(condition, [value for value, folded in zip(condition.values, wanted) if folded not in present],
                        sorted(set(column.dropna().astype(str).str.strip())))
    return held


def _check_values_exist(condition: AttributeFilter, absent, held: list) -> None:
    absent = list(absent)
    if not absent:
        return
    shown = ", ".join(_plain(value) for value in held[:SHOWN_VALUES]) + (", ..." if len(held) > SHOWN_VALUES else "")
    first = _plain(absent[0])
    raise FashionRecError(f"--filter {condition}: no item has {condition.column} {first}"
                          f"{did_you_mean(first, [_plain(v) for v in held])}; it holds: {shown or 'no values'}")


def _number(text: str, where: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise FashionRecError(f"--filter {where}: {str(text).strip()!r} is not a number") from None


def is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _plain(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def json_value(value):
    """A cell as JSON has it: missing -> None, numpy numbers -> Python numbers, whole floats stay floats."""
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def attribute_kinds(table: pd.DataFrame, columns) -> dict[str, str]:
    """``{"colour": "text", "price": "number"}``: what each attribute column holds (filters differ)."""
    return {column: "number" if is_numeric(table[column]) else "text" for column in columns}
