"""Checks shared by the public functions, run up front.

Wrong option types fail with the option's name; a ``key_added`` that would overwrite the stack's reserved keys is
refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from asign._constants import Key

RESERVED_KEYS: dict[str, dict[str, str]] = {
    "obs": {
        Key.SECTION: "each spot's section (the stack contract)",
        Key.MEASURED: "whether each spot has measured counts (the stack contract)",
        Key.REGION: "each spot's shapes element (the stack contract)",
        Key.INSTANCE: "each spot's index in its shapes element (the stack contract)",
        Key.BARCODE: "each spot's original id (the stack contract)",
        Key.Z: "each spot's z position in µm (written by `asign.pp.align_layers`)",
        Key.TOTAL_COUNTS: "each spot's total raw count (written by `asign.pp.normalize`)",
    },
    "obsm": {
        Key.SPATIAL: "the spot centres in native image pixels (the stack contract)",
        Key.SPATIAL_ALIGNED: "the spot centres in the aligned frame (written by `asign.pp.align_layers`)",
        Key.SPATIAL_3D: "the spots' 3D positions (written by `asign.pp.align_layers`)",
        Key.HER2ST_REFERENCE: "the published HER2ST registration (written by `asign.io.read_her2st`)",
    },
    "var": {"n_sections_measured": "in how many sections each gene was measured (the stack contract)"},
    "layers": {Key.COUNTS: "the raw counts (the stack contract)"},
    "uns": {
        Key.UNS: "asign's stack record: the section manifest, the alignment and the unmeasured-gene record",
        "spatialdata_attrs": "SpatialData's table annotation (region, region_key, instance_key)",
    },
}
"""Keys of the spot table that belong to the stack contract (docs/contract.md) and that no ``key_added`` may name,
by slot, with what they hold."""


def check_number(
    name: str, value: Any, *, integer: bool = False, minimum: float | None = None, strict: bool = False
) -> float | int:
    """Return ``value`` as ``int`` / ``float`` after checking its type, finiteness and lower bound.

    NaN and infinite values are refused with a :class:`ValueError`.

    Parameters
    ----------
    name
        The option's name, for the message (e.g. ``"rotation_step"``).
    value
        The value given.
    integer
        Require an integer (``True`` / ``False`` are refused).
    minimum
        Lower bound; `None` for none.
    strict
        ``value > minimum`` instead of ``value >= minimum``.
    """
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        msg = f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    out = int(value) if integer else float(value)
    if not math.isfinite(out):
        msg = f"`{name}` must be a finite number, got {value!r}."
        raise ValueError(msg)
    if minimum is not None and (out <= minimum if strict else out < minimum):
        msg = f"`{name}` must be {'>' if strict else '>='} {minimum:g}, got {value!r}."
        raise ValueError(msg)
    return out


def check_method_option(
    method: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    strict: bool = False,
) -> float | int:
    """:func:`check_number` for an entry of ``method_kwargs``: the message starts with ``method '<method>':``."""
    try:
        return check_number(name, value, integer=integer, minimum=minimum, strict=strict)
    except (TypeError, ValueError) as e:
        msg = f"method {method!r}: {e}"
        raise type(e)(msg) from None


def check_reserved_keys(key_added: Any, table_key: str, **outputs: Iterable[str]) -> None:
    """Refuse a ``key_added`` whose outputs would overwrite a reserved key of the spot table (:data:`RESERVED_KEYS`).

    Call it before any work, with the keys a function would write, by slot (``obs``, ``obsm``, ``var``, ``layers``,
    ``uns``, ``obsp``), e.g. ``check_reserved_keys(key_added, table_key, var=(key, f"{key}_score"), uns=(key,))``.
    Keys an earlier run of the same function wrote under the same ``key_added`` are never reserved, so repeat calls
    stay allowed.

    Raises
    ------
    TypeError
        If ``key_added`` is not a string.
    ValueError
        If ``key_added`` is empty or an output would hit a reserved key; the message names the table, the key and
        what it holds.
    """
    if not isinstance(key_added, str):
        msg = f"`key_added` must be a string, got {key_added!r} ({type(key_added).__name__})."
        raise TypeError(msg)
    if not key_added:
        msg = "`key_added` must be a non-empty string."
        raise ValueError(msg)
    hits = [
        f"`.{slot}[{key!r}]` of table {table_key!r}, which holds {RESERVED_KEYS[slot][key]}"
        for slot, keys in outputs.items()
        for key in keys
        if key in RESERVED_KEYS.get(slot, {})
    ]
    if hits:
        msg = (
            f"key_added={key_added!r} would overwrite {'; and '.join(hits)}. These keys are reserved by asign's data "
            "contract; choose another `key_added`."
        )
        raise ValueError(msg)
