"""Numeric options of the public functions: a wrong type or range fails up front, naming the option."""

from __future__ import annotations

import numpy as np
import pytest

import asign
from asign._checks import check_number


def test_check_number():
    assert check_number("k", np.int64(3), integer=True, minimum=1) == 3
    assert check_number("w", 2, minimum=0.0) == 2.0
    for bad, kw in (("3", {"integer": True}), (True, {"integer": True}), (1.5, {"integer": True}), ("x", {})):
        with pytest.raises(TypeError, match="`k` must be"):
            check_number("k", bad, **kw)
    with pytest.raises(ValueError, match="`k` must be >= 1, got 0"):
        check_number("k", 0, integer=True, minimum=1)
    with pytest.raises(ValueError, match="`s` must be > 0, got 0"):
        check_number("s", 0, minimum=0.0, strict=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf, np.float64("nan")])
def test_check_number_refuses_non_finite(value):
    with pytest.raises(ValueError, match="`x` must be a finite number"):
        check_number("x", value, minimum=0, strict=True)
    with pytest.raises(ValueError, match="`x` must be a finite number"):
        check_number("x", value)


def test_public_functions_check_numeric_options(small_stack):
    sd = small_stack
    before = set(sd.tables["table"].obsm)
    with pytest.raises(ValueError, match="`rotation_step` must be > 0"):
        asign.pp.align_layers(sd, rotation_step=0, show_progress_bar=False)
    with pytest.raises(TypeError, match="`target_size` must be an integer, got 'big'"):
        asign.pp.align_layers(sd, target_size="big", show_progress_bar=False)
    with pytest.raises(TypeError, match="`batch_size` must be an integer, got '16'"):
        asign.pp.extract_features(sd, encoder="handcrafted", batch_size="16", show_progress_bar=False)
    assert set(sd.tables["table"].obsm) == before  # nothing written
    t = sd.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial"], dtype=float)
    with pytest.raises(TypeError, match="`n_genes` must be an integer, got '8'"):
        asign.tl.impute(sd, known="S1", method="mean", n_genes="8", inplace=False)
    with pytest.raises(TypeError, match="`k` must be an integer, got 'five'"):
        asign.tl.impute(sd, known="S1", method="nearest", method_kwargs={"k": "five"}, inplace=False)
    with pytest.raises(TypeError, match=r"ASIGNConfig.hidden_dim='16' must be an integer"):
        asign.tl.impute(sd, known="S1", method="asign", method_kwargs={"hidden_dim": "16"}, inplace=False)
    with pytest.raises(TypeError, match=r"ASIGNConfig.max_epochs=1.5 must be an integer"):
        asign.tl.impute(sd, known="S1", method="asign", method_kwargs={"max_epochs": 1.5}, inplace=False)


def test_gene_sections_and_transforms_name_what_is_wrong(small_stack):
    """Bad `gene_sections` and incomplete `transforms` fail before any work, naming the sections involved."""
    sd = small_stack
    t = sd.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial"], dtype=float)
    with pytest.raises(ValueError, match=r"Unknown gene_sections 'S9'"):
        asign.tl.impute(sd, known="S1", method="mean", gene_sections="S9", inplace=False)
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['S9'\]"):
        asign.tl.impute(sd, known="S1", method="mean", gene_sections=["S1", "S9"], inplace=False)
    eye = np.eye(3)
    with pytest.raises(ValueError, match=r"no matrix for sections \['S3'\]"):
        asign.pp.align_layers(sd, method="transforms", transforms={"S1": eye, "S2": eye})
    assert "asign" not in t.uns or "alignment" not in t.uns["asign"]
