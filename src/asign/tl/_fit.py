"""Train ASIGN on labelled samples and apply it to new ones: :func:`asign.tl.fit` and :func:`asign.tl.predict`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from asign._checks import check_number
from asign._constants import Key
from asign._docs import inject_docs
from asign._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._model import ASIGNConfig, ASIGNModel

FORMAT = "asign-model"
FORMAT_VERSION = 2  # 2: optional fine-tuned spot encoder ("spot_encoder"); files without one are written as 1


def _plain(value: Any) -> Any:
    """Python scalars, lists and dicts only (what ``torch.load(weights_only=True)`` accepts besides tensors)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass
class ASIGNFit:
    """A trained ASIGN model with everything needed to apply it: genes, normalisation, options, training record.

    Use :func:`asign.tl.predict` to apply it, :meth:`save` / :meth:`load` to store it (weights never go into zarr).

    Attributes
    ----------
    models
        The trained :class:`torch.nn.Module` (on the CPU), one per ensemble member (``n_models``; usually one).
        Predictions are averaged over the members.
    config
        Its :class:`~asign._model.ASIGNConfig`.
    genes
        Modelled genes, in the model's output order.
    normalization
        ``"st-net"`` or ``"log1p"``.
    options
        Data options (feature and graph keys, tile-graph settings, validation mode).
    training
        Training record: curve (per-epoch losses, learning rate, validation per-gene PCC), best epoch, timings,
        ``validation`` (the mode used) and ``validation_sample`` (the sample that validated in mode ``"sample"``,
        else ``""``). A transductive model of :func:`fit` also records the spots it was trained on:
        ``known_sections`` (the sections of its known spots) and, when ``known`` did not cover whole sections (a
        mask), ``known_spots`` (their obs names); :func:`predict` reads them.
    mode
        ``"inductive"`` (trained on other samples) or ``"transductive"`` (trained on the known spots of the
        sample it imputes).
    train_samples
        Names of the training samples.
    """

    models: list[ASIGNModel]
    config: ASIGNConfig
    genes: list[str]
    normalization: str
    options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    mode: str = "inductive"
    train_samples: list[str] = field(default_factory=list)

    @property
    def model(self) -> ASIGNModel:
        """The first (usually only) member."""
        return self.models[0]

    def summary(self) -> dict[str, Any]:
        """Zarr-writable record for ``uns`` (config, options, training curve, parameter count, mixing weights)."""
        return {
            "mode": self.mode,
            "transductive": self.mode == "transductive",
            "config": self.config.to_dict(),
            "options": dict(self.options),
            "training": self.training,
            "model": self.model.describe(),
            "n_models": len(self.models),
            "train_samples": list(self.train_samples),
        }

    def save(self, path: str | Path) -> None:
        """Write the weights and the plain configuration with :func:`torch.save` (one file)."""
        import torch

        from asign._model._finetune import spot_encoder

        enc = spot_encoder(self.model)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if enc is not None else 1,
            "state_dicts": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models],
            "config": _plain(self.config.to_dict()),
            "n_genes": int(self.model.n_genes),
            "feature_dims": _plain(self.model.feature_dims),
            "genes": [str(g) for g in self.genes],
            "normalization": str(self.normalization),
            "options": _plain(self.options),
            "training": _plain(self.training),
            "mode": str(self.mode),
            "train_samples": [str(s) for s in self.train_samples],
        }
        if enc is not None:  # its weights are in the state dicts (model.spot_encoder.*); this rebuilds the architecture
            payload["spot_encoder"] = _plain(enc.spec())
        torch.save(payload, Path(path))
        logger.info(
            f"Saved the ASIGN model ({len(self.models)} x {self.model.n_parameters():,} parameters) to {str(path)!r}."
        )

    @classmethod
    def load(cls, path: str | Path, *, encoder: Any = None) -> ASIGNFit:
        """Read a model written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled).

        Parameters
        ----------
        path
            The file written by :meth:`save`.
        encoder
            For a model whose spot encoder was fine-tuned from a user :class:`torch.nn.Module`, a module of the same
            architecture (its weights are replaced by the saved ones); registry encoders are rebuilt by name, so
            `None` (the default) suffices for them. A registry name is not accepted here.

        Raises
        ------
        ValueError
            If the file is not an asign model file (torch cannot read it, or it holds something else), was written by
            a newer asign, or a field is missing or broken (e.g. edited by hand); the message names the path and the
            field. A missing file gives the usual :class:`FileNotFoundError`.
        TypeError
            If ``encoder`` is not a :class:`torch.nn.Module` or `None`.
        """
        import copy

        import torch

        from asign._model import ASIGNConfig, ASIGNModel

        if encoder is not None and not isinstance(encoder, torch.nn.Module):
            shown = repr(encoder) if isinstance(encoder, str) else f"<{type(encoder).__name__}>"
            msg = (
                f"ASIGNFit.load({str(path)!r}): encoder={shown} must be a torch.nn.Module (the architecture of a "
                "spot encoder that was fine-tuned from a user module) or None; an encoder of the registry is rebuilt "
                "by name from the file, so leave `encoder` out for it."
            )
            raise TypeError(msg)
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except OSError:  # no such file, a folder, no permission: the OS error names the path
            raise
        except Exception as e:  # what torch raises depends on the bytes (KeyError, EOFError, UnpicklingError, ...)
            msg = (
                f"{str(path)!r} is not an asign model file (written by ASIGNFit.save): torch.load cannot read it "
                f"({type(e).__name__}). Pass the path of a model saved with `ASIGNFit.save`."
            )
            raise ValueError(msg) from e
        _check_payload(payload, path, encoder=encoder)
        try:
            config = ASIGNConfig.from_dict(dict(payload["config"]))
        except (TypeError, ValueError) as e:
            msg = f"{str(path)!r}: the model's `config` is broken ({e}); save the model again with ASIGNFit.save."
            raise ValueError(msg) from e
        models = []
        for i, state in enumerate(payload["state_dicts"]):
            try:
                model = ASIGNModel(int(payload["n_genes"]), dict(payload["feature_dims"]), config)
                if "spot_encoder" in payload:
                    from asign._model._finetune import attach_encoder, spot_encoder_from_spec

                    module = None if encoder is None else copy.deepcopy(encoder)
                    attach_encoder(model, spot_encoder_from_spec(dict(payload["spot_encoder"]), module=module))
                model.load_state_dict(state)
            except (KeyError, RuntimeError, TypeError, ValueError) as e:
                msg = (
                    f"{str(path)!r}: `state_dicts[{i}]` does not fit the model the file describes (`config`, "
                    f"`n_genes`, `feature_dims`{', `spot_encoder`' if 'spot_encoder' in payload else ''}): {e}"
                )
                raise ValueError(msg) from e
            models.append(model.eval())
        return cls(
            models=models,
            config=config,
            genes=list(payload["genes"]),
            normalization=str(payload["normalization"]),
            options=dict(payload["options"]),
            training=dict(payload["training"]),
            mode=str(payload["mode"]),
            train_samples=list(payload["train_samples"]),
        )


# the keys every file of ASIGNFit.save holds (all format versions), and the data options that tl.predict reads
REQUIRED_KEYS = (
    "format_version",
    "state_dicts",
    "config",
    "n_genes",
    "feature_dims",
    "genes",
    "normalization",
    "options",
    "training",
    "mode",
    "train_samples",
)
PREDICT_OPTIONS = ("feature_key", "graph_key", "tile_radius", "tile_max_neighbors")


def _check_payload(payload: Any, path: str | Path, *, encoder: Any = None) -> None:
    """A ValueError naming ``path`` and the field, when a loaded file is not a complete, well-formed asign model.

    Checked: the format marker, the format version (a newer one first: its keys may differ), every key of
    :data:`REQUIRED_KEYS`, then the fields of :func:`_payload_problem`.
    """
    where = repr(str(path))
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        msg = f"{where} is not an asign model file (written by ASIGNFit.save)."
        raise ValueError(msg)
    version = payload.get("format_version")
    if not isinstance(version, bool) and isinstance(version, int) and version > FORMAT_VERSION:
        msg = (
            f"{where} was written by a newer asign (format {version}; this asign reads formats 1 to {FORMAT_VERSION}); "
            "upgrade asign."
        )
        raise ValueError(msg)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        msg = (
            f"{where} is an asign model file without the field(s) {missing}. The file is incomplete or was edited; "
            "save the model again with ASIGNFit.save."
        )
        raise ValueError(msg)
    if problem := _payload_problem(payload):
        field_name, what = problem
        msg = (
            f"{where} is an asign model file with a broken `{field_name}`: {what}. The file is incomplete or was "
            "edited; save the model again with ASIGNFit.save."
        )
        raise ValueError(msg)
    spec = payload.get("spot_encoder")
    if encoder is None and isinstance(spec, Mapping) and spec.get("user_module"):
        msg = (
            f"{where}: this model's spot encoder was fine-tuned from a user torch.nn.Module; load it with "
            "`ASIGNFit.load(path, encoder=<a module of the same architecture>)`."
        )
        raise ValueError(msg)
    if encoder is not None and spec is None:
        logger.warning(
            f"ASIGNFit.load: {where} has no fine-tuned spot encoder (the model reads the stored features of "
            "`asign.pp.extract_features`), so `encoder` is not used."
        )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _payload_problem(payload: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first broken field of a model file with every key of :data:`REQUIRED_KEYS`, and what is wrong, or `None`.

    ``format_version`` (an int >= 1), ``state_dicts`` (a non-empty list of mappings), ``n_genes`` (an int >= 1),
    ``genes`` (``n_genes`` unique strings), ``feature_dims`` (non-negative ints by level), ``normalization``,
    ``config``, ``options`` and ``training`` (mappings; ``options`` with the data options :func:`predict` reads,
    :data:`PREDICT_OPTIONS`), ``mode``, ``train_samples`` (strings) and, where present, ``spot_encoder``.
    """
    from asign.pp._genes import NORMALIZATIONS

    version, states, n = payload["format_version"], payload["state_dicts"], payload["n_genes"]
    genes, dims, opts = payload["genes"], payload["feature_dims"], payload["options"]
    if not _is_int(version, 1):
        return "format_version", f"{version!r} is not a format number (an int >= 1)"
    if not isinstance(states, list | tuple) or not states or not all(isinstance(s, Mapping) for s in states):
        return "state_dicts", "it must be a non-empty list of state dicts (one per ensemble member)"
    if not _is_int(n, 1):
        return "n_genes", f"{n!r} is not an int >= 1"
    if not isinstance(genes, list | tuple) or not all(isinstance(g, str) for g in genes):
        return "genes", "it must be a list of gene names (str)"
    if len(genes) != n:
        return "genes", f"{len(genes)} names for n_genes={n}"
    if dup := sorted(g for g, c in Counter(genes).items() if c > 1):
        return "genes", f"{len(dup)} name(s) repeated, e.g. {dup[:5]}"
    if not isinstance(dims, Mapping) or not all(_is_int(v, 0) for v in dims.values()):
        return "feature_dims", f"{dims!r} is not a mapping level -> feature width (an int >= 0)"
    if payload["normalization"] not in NORMALIZATIONS:
        return "normalization", f"{payload['normalization']!r} is not one of {list(NORMALIZATIONS)}"
    for key in ("config", "options", "training"):
        if not isinstance(payload[key], Mapping):
            return key, f"a {type(payload[key]).__name__}, not a mapping"
    if lacking := [k for k in PREDICT_OPTIONS if k not in opts]:
        return "options", f"no {lacking} (tl.predict reads them)"
    if opts["feature_key"] is not None and not isinstance(opts["feature_key"], str):
        return "options", f"feature_key={opts['feature_key']!r} is not a str or None"
    if not isinstance(opts["graph_key"], str):
        return "options", f"graph_key={opts['graph_key']!r} is not a str"
    if payload["mode"] not in ("inductive", "transductive"):
        return "mode", f"{payload['mode']!r} is not 'inductive' or 'transductive'"
    samples = payload["train_samples"]
    if not isinstance(samples, list | tuple) or not all(isinstance(s, str) for s in samples):
        return "train_samples", "it must be a list of sample names (str)"
    if "spot_encoder" in payload and not isinstance(payload["spot_encoder"], Mapping):
        return "spot_encoder", f"a {type(payload['spot_encoder']).__name__}, not a mapping"
    return None


def load(path: str | Path, *, encoder: Any = None) -> ASIGNFit:
    """Read a model written by :meth:`ASIGNFit.save` (``encoder``: see :meth:`ASIGNFit.load`)."""
    return ASIGNFit.load(path, encoder=encoder)


# keyword arguments of `fit` that are also ASIGN options, with their defaults: `config` may give them instead
FIT_KEYWORDS = {
    "preset": "default",
    "validation": "auto",
    "n_models": None,
    "n_jobs": "auto",
    "feature_key": Key.ADDED,
    "graph_key": Key.ADDED,
    "seed": 0,
}


def _named(samples: Any, table_key: str) -> list[tuple[str, SpatialData]]:
    from spatialdata import SpatialData

    from asign.pp._genes import _as_sample_list

    if isinstance(samples, SpatialData):
        from asign.pp._genes import _sample_name

        return [(_sample_name(samples, "sample_0", table_key), samples)]
    from ._impute import TRAIN_TWICE, check_distinct_samples

    out = _as_sample_list(samples)
    if not out:
        msg = "`samples` is empty; pass at least one SpatialData stack."
        raise ValueError(msg)
    counts = Counter(name for name, _ in out)
    dup = [name for name, c in counts.items() if c > 1]
    if dup:  # a name is how `known=`, the training record and the validation sample tell the samples apart
        src = (
            "their keys collide as strings"
            if isinstance(samples, Mapping)
            else "a sequence names each sample by its uns['asign']['dataset']['patient']"
        )
        msg = (
            f"Training samples share the name(s) {dup} ({src}), so `known=` and the training record could not tell "
            "them apart. Pass a mapping {name: sdata} with unique names, e.g. "
            f"{{{dup[0] + '_a'!r}: sdata_a, {dup[0] + '_b'!r}: sdata_b}}."
        )
        raise ValueError(msg)
    check_distinct_samples(out, TRAIN_TWICE)
    return out


def _check_fit_known(table: AnnData, mask: np.ndarray, measured: np.ndarray) -> None:
    """Errors for a training sample's ``known`` mask that selects no spot or unmeasured spots (all spots is fine)."""
    if not mask.any():
        msg = "`known` selects no spot; name at least one measured section (or pass a mask with True entries)."
        raise ValueError(msg)
    bad = mask & ~measured
    if bad.any():
        secs = sorted(set(table.obs[Key.SECTION].astype(str).to_numpy()[bad]))
        msg = (
            f"`known` includes {int(bad.sum())} spot(s) without measured counts (sections {secs}); known spots must "
            "be measured."
        )
        raise ValueError(msg)


@inject_docs()
def fit(
    samples: Mapping[str, SpatialData] | Sequence[SpatialData] | SpatialData,
    *,
    known: Any = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 250,
    normalization: str = "st-net",
    preset: str = "default",
    config: Mapping[str, Any] | None = None,
    validation: str = "auto",
    n_models: int | None = None,
    n_jobs: int | str = "auto",
    feature_key: str = Key.ADDED,
    graph_key: str = Key.ADDED,
    table_key: str = Key.TABLE,
    seed: int = 0,
    device: Any = None,
    show_progress_bar: bool = True,
) -> ASIGNFit:
    """Train an ASIGN model on labelled section stacks.

    Every sample needs image features (:func:`asign.pp.extract_features`) and the whole-sample 3D graph
    (:func:`asign.pp.neighbors_3d`). A fresh model is initialised from ``seed``. Each training step processes one
    sample's whole graph (or, when it does not fit the memory budget, neighbour-sampled subgraphs around batches of
    loss spots: ``config={{"subgraph": ..., "batch_size": ..., "fanout": ...}}``) with a visible set drawn by the
    mask (``mask="section"``: one labelled section visible, the others hidden; ``mask="spot"``: a random fraction of
    the labelled spots); hidden labels are NaN in the only label tensor the model sees and the loss is computed on
    them alone.

    Parameters
    ----------
    samples
        Training stacks (a mapping ``name -> SpatialData``, a sequence, or one stack). A sequence names each sample
        by its ``uns['asign']['dataset']['patient']``, else ``train_<i>``; names must be unique (they key
        ``known`` and the training record), so several samples of one patient are refused in a sequence: pass
        them as a mapping with unique names.
    known
        Which measured spots of each sample are labelled: `None` (every measured spot), section name(s) applied to
        every sample, or a mapping ``sample name -> section name(s), boolean mask or None`` with an entry for every
        sample (`None`: every measured spot of that sample). Labels of the other spots are never read. ``known``
        must select at least one spot of each sample, and measured spots only; it may select every spot (a fully
        labelled training sample). With one sample and ``known`` set (not `None`), the model is trained
        transductively (spot masking) and recorded as such. Errors name the sample.
    genes
        Modelled genes (each once, present in every sample); `None` ranks the top ``n_genes`` by mean raw count on
        the labelled spots of ``samples``.
    n_genes
        Number of genes when ``genes`` is `None`.
    normalization
        ``"st-net"`` or ``"log1p"``.
    preset
        ``"default"`` or ``"paper_code"`` (the released code's hyper-parameters; see
        :meth:`asign._model.ASIGNConfig.from_preset`).
    config
        Model / training options overriding the preset (fields of :class:`asign._model.ASIGNConfig`, e.g.
        ``{{"hidden_dim": 128, "max_epochs": 50}}``). ``{{"finetune_encoder": True}}`` fine-tunes the spot encoder
        end to end on the spot patches (GPU recommended); ``"encoder"`` (a registry name or a
        :class:`torch.nn.Module`; default: the encoder of :func:`asign.pp.extract_features`), ``"encoder_weights"``
        and ``"encoder_input_size"`` choose it. The data options of docs/api.md (``gene_rank``, ``nearest_blend``,
        ``tile_radius``, ...) go here too. An option that is also a keyword of ``fit`` (``preset``, ``validation``,
        ``n_models``, ``n_jobs``, ``feature_key``, ``graph_key``, ``seed``) may be given either way: config's value
        is used where the keyword is left at its default, and two different values are refused.
    validation
        Early stopping: ``"auto"``, ``"holdout"`` or ``"none"``. ``"auto"`` with several samples validates on the
        last sample whose labels span at least two sections (its first labelled section visible, its other labelled
        sections scored; recorded as ``training["validation_sample"]``; a warning is logged when it is not the last
        sample); when no sample qualifies (e.g. ``known="S1"``), and with one sample, a held-out fraction of the
        labelled spots of every sample (``"holdout"``; with a warning in the first case).
    n_models
        Ensemble size: independently initialised members (seeds spawned from ``seed``; each with its own hold-out
        split), predictions averaged. Default: 1, or 3 for a model trained transductively (one sample with
        ``known`` set), as :func:`asign.tl.impute` trains it.
    n_jobs
        Worker processes that train ensemble members in parallel on the CPU: ``"auto"`` (one per member, up to the
        usable cores; torch threads are divided among them) or a number. On a GPU members train one after another.
        The result does not depend on it beyond floating-point summation order.
    feature_key
        Prefix of the features and tile tables of :func:`asign.pp.extract_features`.
    graph_key
        Prefix of the graph of :func:`asign.pp.neighbors_3d`.
    {table_key}
    {seed}
    {device}
    {show_progress_bar}

    Returns
    -------
    An :class:`ASIGNFit` (``.save(path)``, ``ASIGNFit.load(path)``), applied with :func:`asign.tl.predict`. A
    transductive model records its known spots in ``training['known_sections']`` (and ``training['known_spots']``,
    their obs names, when ``known`` does not cover whole sections).
    """
    from asign.io._validate import validate_stack
    from asign.pp._genes import check_normalization, gene_indices, known_mask, section_gene_means, top_genes

    from ._asign import fit_contexts
    from ._impute import build_context, check_gene_list

    check_normalization(normalization)
    config = dict(config or {})
    given = {"preset": preset, "validation": validation, "n_models": n_models, "n_jobs": n_jobs}
    given |= {"feature_key": feature_key, "graph_key": graph_key, "seed": seed}
    seed_name = "config['seed']" if "seed" in config and seed == FIT_KEYWORDS["seed"] else "seed"
    for k, default in FIT_KEYWORDS.items():  # one value per option: config's, unless the keyword says otherwise
        if k in config:
            if given[k] != default and given[k] != config[k]:
                msg = f"config[{k!r}] = {config[k]!r} and {k}={given[k]!r} disagree; give {k} once."
                raise ValueError(msg)
            given[k] = config.pop(k)
    preset, validation, n_models, n_jobs = given["preset"], given["validation"], given["n_models"], given["n_jobs"]
    feature_key, graph_key, seed = given["feature_key"], given["graph_key"], given["seed"]
    seed = check_number(seed_name, seed, integer=True, minimum=0)
    if n_models is not None:
        n_models = check_number("n_models", n_models, integer=True, minimum=1)
    named = _named(samples, table_key)
    if genes is not None:
        genes = check_gene_list(genes)
    masks, specs = [], []
    for name, s in named:
        stack = validate_stack(s, table_key=table_key)
        t = s.tables[table_key]
        measured = t.obs[Key.MEASURED].to_numpy(dtype=bool)
        if isinstance(known, Mapping) and name not in known:
            msg = f"`known` has no entry for training sample {name!r}; add one (`None` labels every measured spot)."
            raise ValueError(msg)
        spec = known.get(name) if isinstance(known, Mapping) else known
        try:
            m = measured if spec is None else known_mask(t, stack, spec)
            _check_fit_known(t, m, measured)
            if genes is not None:
                gene_indices(t, genes)
        except (KeyError, ValueError) as e:
            msg = f"Training sample {name!r}: {e.args[0]}"
            raise (KeyError if isinstance(e, KeyError) else ValueError)(msg) from None
        masks.append((m, stack))
        specs.append(spec)
    if genes is None:
        frames = [section_gene_means(s.tables[table_key], m, st) for (_, s), (m, st) in zip(named, masks, strict=True)]
        genes, _ = top_genes(frames, n_genes)
    genes = [str(g) for g in genes]
    params = dict(config)
    params["preset"] = preset
    params["validation"] = validation
    if n_models is not None:  # else the option's default: 1, or 3 transductively
        params["n_models"] = n_models
    params["n_jobs"] = n_jobs
    params["feature_key"] = feature_key
    params["graph_key"] = graph_key
    contexts = [
        build_context(
            s,
            stack=st,
            known=m,
            genes=genes,
            normalization=normalization,
            table_key=table_key,
            params=params,
            seed=seed,
            device=device,
            show_progress_bar=show_progress_bar,
            sample=name,
        )
        for (name, s), (m, st) in zip(named, masks, strict=True)
    ]
    transductive = len(contexts) == 1 and specs[0] is not None
    fitted = fit_contexts(
        contexts,
        params=params,
        seed=seed,
        device=device,
        show_progress_bar=show_progress_bar,
        transductive=transductive,
    )
    if transductive:  # the spots whose labels trained it: predict may not score them
        (_, s), (m, st) = named[0], masks[0]
        fitted.training.update(_known_record(s.tables[table_key], m, st))
    return fitted


def _known_record(table: AnnData, mask: np.ndarray, stack: Any) -> dict[str, list[str]]:
    """The training record of a transductive model's known spots ``mask``.

    ``known_sections``: the sections that hold them (cutting order); ``known_spots``: their obs names, only when they
    are not every measured spot of those sections.
    """
    sec = table.obs[Key.SECTION].astype(str).to_numpy()
    secs = [s for s in stack.sections if s in set(sec[mask])]
    whole = table.obs[Key.MEASURED].to_numpy(dtype=bool) & np.isin(sec, secs)
    record = {"known_sections": secs}
    if not np.array_equal(mask, whole):
        record["known_spots"] = [str(x) for x in table.obs_names[mask]]
    return record


def _check_model_genes(table: AnnData, fitted: ASIGNFit, table_key: str, sample: str) -> None:
    """A KeyError, before any work, naming the model genes that the table to predict on lacks."""
    missing = [g for g, i in zip(fitted.genes, table.var_names.get_indexer(fitted.genes), strict=True) if i < 0]
    if missing:
        where = f"sdata.tables[{table_key!r}]" + (f" (sample {sample!r})" if sample else "")
        trained = f" (trained on {list(fitted.train_samples)})" if fitted.train_samples else ""
        msg = (
            f"{where} lacks {len(missing)} of the model's {len(fitted.genes)} genes: {missing[:10]}"
            f"{f' (+{len(missing) - 10} more)' if len(missing) > 10 else ''}. tl.predict needs every gene the "
            f"model{trained} was trained on; predict on a stack that has them, or fit a model on genes it has."
        )
        raise KeyError(msg)


def _trained_spots_left_out(training: Mapping[str, Any], sdata: SpatialData, known: Any, table_key: str) -> int | None:
    """How many spots a transductive model was trained on (``training``'s record) ``known`` leaves out of the stack.

    `None` when ``known`` or the stack cannot be read (the stack validation of :func:`predict` says what is wrong).
    """
    from asign._stack import get_stack
    from asign.pp._genes import known_mask

    try:
        table = sdata.tables[table_key]
        mask = known_mask(table, get_stack(table), known)
        sec = table.obs[Key.SECTION].astype(str).to_numpy()
        measured = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    if "known_spots" in training:
        trained = table.obs_names.isin([str(x) for x in training["known_spots"]])
    else:
        trained = measured & np.isin(sec, [str(x) for x in training["known_sections"]])
    return int((trained & ~mask).sum())


def _check_not_training_sample(fitted: ASIGNFit, sdata: SpatialData, known: Any, sample: str, table_key: str) -> None:
    """A ValueError when predicting on the stack would score labels that trained the model.

    The stack is taken for a training sample by name: its ``uns['asign']['dataset']['patient']`` (``sample``;
    ``""``: unnamed, not checked) is one of the model's ``train_samples``. A transductive model that records its
    known spots (``training['known_sections']``, :func:`fit`) refuses only a ``known`` that leaves some of them out;
    an inductive model, and a transductive one without the record (older files), refuse the name.
    """
    if not sample or sample not in {str(s) for s in fitted.train_samples}:
        return
    how = (
        f"(sdata.tables[{table_key!r}].uns['asign']['dataset']['patient'] is {sample!r}; the model's train_samples "
        f"are {list(fitted.train_samples)})"
    )
    rename = (
        f"If it is another sample, give it its own name in `uns['asign']['dataset']['patient']` (e.g. '{sample}_new')."
    )
    transductive = fitted.mode == "transductive"
    if transductive and "known_sections" in fitted.training:
        left = _trained_spots_left_out(fitted.training, sdata, known, table_key)
        if not left:  # the same known (or more): the training labels are inputs, never scored
            return
        secs = [str(x) for x in fitted.training["known_sections"]]
        partial = " (some of their spots)" if "known_spots" in fitted.training else ""
        msg = (
            f"The stack to predict on has the same name as training sample {sample!r} {how}, and the model was "
            f"trained transductively on its known spots, in section(s) {secs}{partial}: this `known` leaves {left} "
            "of them out, so their training labels would be scored as predictions. Predict with a `known` that "
            f"includes them (e.g. the `known` the model was fitted with), or use `asign.tl.impute(sdata, "
            f"known=..., method='asign')` to train on other known spots. {rename}"
        )
        raise ValueError(msg)
    if transductive:
        advice = (
            "The model was trained transductively on its known spots, and its file does not record which (older "
            "asign): refit it with `asign.tl.fit` to predict with the same `known`, or use "
            "`asign.tl.impute(sdata, known=..., method='asign')` to impute it from its own known spots."
        )
    else:
        advice = (
            "Predict on a sample the model was not trained on (fit a model without "
            f"{sample!r} to evaluate on it), or use `asign.tl.impute(sdata, known=..., method='asign')` to train on "
            "its known spots only (transductive mode)."
        )
    msg = (
        f"The stack to predict on has the same name as training sample {sample!r} {how}, so it is taken for that "
        f"sample, whose labels trained the model and would be scored as predictions. {rename} {advice}"
    )
    raise ValueError(msg)


@inject_docs()
def predict(
    sdata: SpatialData,
    model: ASIGNFit | str | Path,
    *,
    known: Any,
    table_key: str = Key.TABLE,
    key_added: str = Key.OUTPUT_TABLE,
    overwrite: bool = False,
    inplace: bool = True,
    nearest_blend: float | None = None,
    gene_rank: int | None | Literal["model"] = "model",
    device: Any = None,
    show_progress_bar: bool = True,
) -> AnnData | None:
    """Apply a trained ASIGN model to a stack whose ``known`` section(s) are measured.

    Inference is deterministic (``model.eval()``, the whole-sample graph, no random edges); the known spots are the
    visible set of the propagation and the level of the network; labels of every other spot are never read.

    Scoring labels that trained the model is refused, before any work. The check is by sample name: the stack's
    ``uns['asign']['dataset']['patient']`` against the model's ``train_samples`` (the names :func:`asign.tl.fit`
    gave its samples: the keys of a mapping, else the patient names). An inductive model refuses a stack of a
    training sample's name (another sample of the same name: give it its own name). A transductive model (one sample
    fitted with ``known``) refuses its sample only when ``known`` leaves out spots it was trained on (recorded in its
    ``training['known_sections']`` / ``training['known_spots']``): with the same ``known``, or more, its labels are
    inputs and nothing is scored, so a saved transductive model may be applied again (e.g. with another
    ``nearest_blend`` or ``gene_rank``); a transductive model file without that record (older asign) refuses the
    name. A stack without a patient name is not checked, nor one that was trained under another name (a mapping key
    that is not its patient name). To impute a sample from its own known spots, use :func:`asign.tl.impute`
    (transductive mode).

    Parameters
    ----------
    {sdata}
    model
        An :class:`ASIGNFit` from :func:`asign.tl.fit`, or the path of one saved with :meth:`ASIGNFit.save`.
    known
        Section name(s) or a boolean row mask of the measured spots the model may use.
    {table_key}
    key_added
        Key of the output table (a valid SpatialData element name; checked before anything runs).
    overwrite
        Replace an output table that an earlier asign call wrote under ``key_added``.
    {inplace}
    nearest_blend
        Weight of the aligned nearest known spots in the prediction (``method_kwargs`` of :func:`asign.tl.impute`);
        `None` uses the model's (0.25 for a transductive image model of the default preset, 0.5 otherwise). ``0``
        predicts without ``obsm['spatial_aligned']``.
    gene_rank
        Number of gene axes of the known spots to project the prediction on; ``"model"`` uses the model's (10 by
        default), `None` does not project.
    {device}
    {show_progress_bar}

    Returns
    -------
    If ``inplace = False``, the output :class:`~anndata.AnnData`; otherwise adds ``sdata.tables['{{key_added}}']``
    exactly like :func:`asign.tl.impute` with ``method="asign"``: ``.layers['target']``, ``.layers['imputed']``,
    ``.layers['network']`` (network prediction before mixing), ``.layers['propagation']`` (where the model was
    fitted with ``use_propagation=True``), ``.layers['full_rank']`` (the prediction before the ``gene_rank``
    projection, where the model's options ask for one), ``.layers['nearest']`` (where ``nearest_blend`` > 0),
    ``.obs['known']``, and ``.uns['asign']`` (with ``result`` = the model's configuration, training record,
    mode, ``nearest_blend`` and ``gene_rank`` as applied).
    """
    from asign.pp._genes import _sample_name

    from ._impute import _check_key_added, run_impute, write_output_table

    if not isinstance(model, ASIGNFit | str | Path):
        msg = f"`model` must be an ASIGNFit (from asign.tl.fit) or the path of a saved one, got {type(model).__name__}."
        raise TypeError(msg)
    fitted = model if isinstance(model, ASIGNFit) else ASIGNFit.load(model)
    if inplace:
        _check_key_added(sdata, key_added, table_key, overwrite=overwrite)
    sample = _sample_name(sdata, "", table_key)
    _check_not_training_sample(fitted, sdata, known, sample, table_key)
    if table_key in sdata.tables:  # else run_impute's stack validation names the missing table
        _check_model_genes(sdata.tables[table_key], fitted, table_key, sample)
        from ._asign import check_sample_inputs, tensor_options

        # what the model reads (features, tile tables, graph), with advice for predict: the model fixes the levels
        check_sample_inputs(
            sdata.tables[table_key],
            sdata.tables,
            table_key,
            sample,
            for_predict=True,
            **tensor_options(fitted.config, fitted.options),
        )
    out = run_impute(
        sdata,
        known=known,
        method="asign",
        genes=fitted.genes,
        n_genes=len(fitted.genes),
        normalization=fitted.normalization,
        gene_sections="labelled",
        train=(),
        train_ctx=[],
        fitted=fitted,
        method_kwargs={
            **({} if nearest_blend is None else {"nearest_blend": nearest_blend}),
            **({} if gene_rank == "model" else {"gene_rank": gene_rank}),
        },
        table_key=table_key,
        seed=int(fitted.config.seed),
        device=device,
        show_progress_bar=show_progress_bar,
        sample=sample,
        for_predict=True,
    )
    if not inplace:
        return out
    write_output_table(sdata, key_added, out)
    return None
