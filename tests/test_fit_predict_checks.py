"""Input checks of :func:`asign.tl.fit` and :func:`asign.tl.predict` that fail before any work."""

from __future__ import annotations

import pytest

import asign
from asign.tl._fit import ASIGNFit


def _stack(seed, patient=None):
    s = asign.datasets.synthetic_stack(n_sections=2, n_spots=30, n_genes=12, images=False, seed=seed)
    if patient is not None:
        s.tables["table"].uns["asign"]["dataset"] = {"patient": patient}
    return s


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"seed": None}, TypeError, r"`seed` must be an integer, got None"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an integer, got 1.5"),
        ({"seed": "3"}, TypeError, r"`seed` must be an integer, got '3'"),
        ({"seed": False}, TypeError, r"`seed` must be an integer, got False"),
        ({"config": {"seed": -2}}, ValueError, r"`config\['seed'\]` must be >= 0, got -2"),
    ],
)
def test_fit_refuses_a_bad_seed_up_front(kw, err, match):
    """seed=None used to fail in build_context, -1 in numpy, and 1.5 / '3' were truncated / parsed silently."""
    with pytest.raises(err, match=match):
        asign.tl.fit({"A": _stack(0), "B": _stack(1)}, n_genes=4, show_progress_bar=False, **kw)


@pytest.mark.parametrize(("n_models", "err"), [(1.5, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError)])
def test_fit_refuses_a_bad_n_models_up_front(n_models, err):
    """tl.fit converted n_models with int(): 1.5 and True trained one member and "2" two, silently."""
    with pytest.raises(err, match="n_models"):
        asign.tl.fit({"A": _stack(0), "B": _stack(1)}, n_genes=4, n_models=n_models, show_progress_bar=False)


def test_fit_refuses_duplicate_sample_names():
    """Two stacks of one patient in a sequence got the same name: `known=` could not tell them apart."""
    a, b, c = _stack(0, "P1"), _stack(1, "P1"), _stack(2, "P2")
    with pytest.raises(ValueError, match=r"share the name\(s\) \['P1'\].*Pass a mapping \{name: sdata\} with unique"):
        asign.tl.fit([a, b, c], n_genes=4, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"share the name\(s\) \['P1'\]"):
        asign.tl.fit([a, b], known={"P1": "S1"}, n_genes=4, show_progress_bar=False)
    with pytest.raises(ValueError, match="collide as strings"):
        asign.tl.fit({1: a, "1": b}, n_genes=4, show_progress_bar=False)


def test_predict_names_the_model_genes_the_stack_lacks():
    """A stack lacking model genes used to give a bare KeyError from deep inside."""
    sd = _stack(3, "P9")
    t = sd.tables["table"]
    genes = [*map(str, t.var_names[:3]), *(f"absent_{i}" for i in range(12))]
    model = ASIGNFit(models=[], config=None, genes=genes, normalization="st-net", train_samples=["A", "B"])
    with pytest.raises(
        KeyError,
        match=r"sdata.tables\['table'\] \(sample 'P9'\) lacks 12 of the model's 15 genes: \['absent_0', .*'absent_9'\] "
        r"\(\+2 more\)\. tl.predict needs every gene the model \(trained on \['A', 'B'\]\) was trained on",
    ):
        asign.tl.predict(sd, model, known="S1", show_progress_bar=False)
    assert set(sd.tables) == {"table"}


def test_docstrings_say_when_the_propagation_layer_is_written():
    """A model with use_propagation=False writes no layers['propagation']: the docstrings used to promise it."""
    import re

    for f in (asign.tl.predict, asign.tl.impute):
        doc = " ".join(f.__doc__.split())
        assert re.search(r"'propagation'\]?`` \(?where (the model was fitted with )?``use_propagation=True``", doc)
