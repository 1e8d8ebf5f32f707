"""Readers, the stack builder, the contract check and the safe writer."""

from __future__ import annotations

from ._build import Section, stack_sections
from ._her2st import read_her2st
from ._persist import persist, recover
from ._validate import StackValidationError, validate_stack

__all__ = [
    "Section",
    "StackValidationError",
    "persist",
    "read_her2st",
    "recover",
    "stack_sections",
    "validate_stack",
]
