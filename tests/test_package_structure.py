"""Package conventions: a light top-level import and scverse-style public signatures."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

NAMESPACES = ("asign.io", "asign.pp", "asign.tl", "asign.pl", "asign.datasets")
HEAVY = ("torch", "torch_geometric", "ants", "spatialdata", "squidpy", "napari", "scanpy", "anndata")
DATA_PARAMS = ("sdata", "adata", "data", "samples")
DATA_TYPES = ("SpatialData", "AnnData", "DataFrame")
# public functions that create the data object instead of taking one
NO_DATA_OBJECT = {"asign.io.read_her2st", "asign.io.stack_sections"}
SRC = Path(__file__).resolve().parents[1] / "src" / "asign"


def test_import_asign_is_light():
    code = f"import sys, asign; print('heavy=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("heavy=")][0]
    assert line == "heavy=", f"`import asign` imports {line.removeprefix('heavy=')}"


def _public_functions():
    found = []
    for ns_name in NAMESPACES:
        ns = importlib.import_module(ns_name)
        for name in ns.__all__:
            obj = getattr(ns, name)  # a name whose module is missing fails here, not silently skipped
            if inspect.isfunction(obj):
                found.append((f"{ns_name}.{name}", obj))
    return found


PUBLIC = _public_functions()


def test_known_public_functions_exist():
    names = {n for n, _ in PUBLIC}
    expected = {
        "asign.io.stack_sections",
        "asign.io.validate_stack",
        "asign.io.read_her2st",
        "asign.io.persist",
        "asign.datasets.synthetic_stack",
        "asign.datasets.her2st",
        "asign.pp.make_spots",
    }
    assert expected <= names


def test_lazy_namespaces_resolve_to_their_modules():
    for ns_name in ("asign.pp", "asign.tl", "asign.pl"):
        ns = importlib.import_module(ns_name)
        assert sorted(ns.__all__) == sorted(ns._MAPPING) == ns.__dir__()
        for name, module in ns._MAPPING.items():
            obj = getattr(ns, name)
            assert obj.__module__ == f"{ns_name}.{module}", name
    with pytest.raises(AttributeError):
        importlib.import_module("asign.pp").does_not_exist  # noqa: B018


@pytest.mark.parametrize(("name", "func"), PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_signature(name, func):
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if params and not (name.startswith("asign.datasets.") or name in NO_DATA_OBJECT):
        first = params[0]
        ann = first.annotation if isinstance(first.annotation, str) else str(first.annotation)
        assert first.name in DATA_PARAMS or any(t in ann for t in DATA_TYPES), (
            f"{name}: the first parameter must be the data object (sdata), got {first.name!r}"
        )
    assert len(positional) <= 3, f"{name}: at most 3 positional parameters, got {[p.name for p in positional]}"
    for p in params:
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        is_bool = ann.split(" | ")[0] == "bool" or isinstance(p.default, bool)
        if is_bool:
            assert p.kind == p.KEYWORD_ONLY, f"{name}: boolean parameter {p.name!r} must be keyword-only"
    if "inplace" in sig.parameters:
        p = sig.parameters["inplace"]
        assert p.default is True, f"{name}: `inplace` must default to True"
        assert p.kind == p.KEYWORD_ONLY


@pytest.mark.parametrize(("name", "func"), PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_docstring_lists_every_parameter(name, func):
    doc = inspect.getdoc(func) or ""
    assert "Parameters" in doc or not inspect.signature(func).parameters, f"{name}: no Parameters section"
    assert "Returns" in doc, f"{name}: no Returns section"
    documented = set()
    for line in doc.splitlines():
        if line and not line[0].isspace():  # numpydoc: "name", "name : type" or "name1, name2"
            documented.update(n.strip() for n in line.split(" : ")[0].split(","))
    for p in inspect.signature(func).parameters:
        if p in ("args", "kwargs"):
            continue
        assert p in documented, f"{name}: parameter {p!r} is not documented"


def test_every_module_starts_with_future_annotations():
    missing = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "_version.py":
            continue
        text = f.read_text()
        if text.strip() and "from __future__ import annotations" not in text:
            missing.append(str(f.relative_to(SRC)))
    assert not missing, f"modules without `from __future__ import annotations`: {missing}"
