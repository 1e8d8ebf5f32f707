"""Image baselines (method.md §7.3): ``"ridge"`` and ``"similarity"`` on frozen image features.

Both read the features written by :func:`asign.pp.extract_features` (``obsm['{features_key}_features_<level>']``)
and only ``ctx.Y`` for labels (NaN outside the known spots). They run through :func:`asign.tl.impute`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asign._checks import check_method_option
from asign._constants import Key
from asign._logging import logger
from asign.pp._features import check_feature_space, common_feature_space, feature_matrix

from ._gene_rank import gene_rank_option, without_gene_rank
from ._registry import FitContext, ImputeContext, ImputeResult, register_method

RIDGE_DEFAULTS: dict[str, Any] = {
    "features_key": Key.ADDED,
    "levels": ["spot"],
    "n_components": 256,
    "alphas": None,
    "cv": 5,
    "standardize": True,
}
SIMILARITY_DEFAULTS: dict[str, Any] = {
    "features_key": Key.ADDED,
    "levels": ["spot"],
    "k": 20,
    "standardize": False,
}
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)


def _params(params: dict[str, Any], method: str, defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        msg = f"Method {method!r} got unknown parameter(s) {unknown}; it accepts {sorted(defaults)}."
        raise ValueError(msg)
    out = {**defaults, **params}
    if isinstance(out["levels"], str):
        out["levels"] = [out["levels"]]
    out["levels"] = [str(v) for v in out["levels"]]
    return out


def _features(table, key: str, levels: Sequence[str]) -> np.ndarray:
    return feature_matrix(table, key=key, levels=levels)


def _usable(X: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(X), axis=1)


def _fallback(pred: np.ndarray, missing: np.ndarray, mean: np.ndarray, method: str) -> int:
    n = int(missing.sum())
    if n:
        pred[missing] = mean
        logger.warning(
            f"{method}: {n} spots have no image features (sections without image or not processed); they get the "
            "mean of the labelled training spots (a constant)."
        )
    return n


def _spatial_groups(xy: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """Contiguous spatial blocks (k-means on coordinates) for CV within one section."""
    from sklearn.cluster import KMeans

    n_groups = int(min(n_groups, len(xy)))
    km = KMeans(n_clusters=n_groups, n_init=4, random_state=seed)
    return km.fit_predict(np.asarray(xy, dtype=np.float64))


def _fit_ridge(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    *,
    n_components: int,
    alphas: np.ndarray,
    cv: int,
    seed: int,
    standardize: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """StandardScaler -> PCA -> Ridge, alpha chosen by grouped CV (R², uniform over genes).

    ``standardize=False`` only centres the features (the scaler keeps each dimension's scale).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        msg = "ridge: the training spots form a single CV group; at least two are needed to choose alpha."
        raise ValueError(msg)
    splitter = LeaveOneGroupOut() if n_groups <= cv else GroupKFold(n_splits=cv)
    splits = list(splitter.split(X, Y, groups))
    min_train = min(len(tr) for tr, _ in splits)
    nc = int(max(1, min(n_components, X.shape[1], min_train - 1)))
    # Scaler and PCA do not depend on alpha: fit them once per fold and score every alpha in closed form
    # (ridge through the SVD of the fold's PCA scores), which equals a grid search over the whole pipeline.
    scores = np.zeros((len(splits), len(alphas)))
    for f, (tr, te) in enumerate(splits):
        prep = Pipeline(
            [
                ("scale", StandardScaler(with_std=bool(standardize))),
                ("pca", PCA(n_components=nc, svd_solver="full", random_state=seed)),
            ]
        )
        Ztr, Zte = prep.fit_transform(X[tr]), prep.transform(X[te])
        ymean = Y[tr].mean(axis=0)
        U, sv, Vt = np.linalg.svd(Ztr - Ztr.mean(axis=0), full_matrices=False)
        UtY = U.T @ (Y[tr] - ymean)
        ss_tot = ((Y[te] - Y[te].mean(axis=0)) ** 2).sum(axis=0)
        for a, alpha in enumerate(alphas):
            coef = Vt.T @ ((sv / (sv**2 + alpha))[:, None] * UtY)
            pred = (Zte - Ztr.mean(axis=0)) @ coef + ymean
            ss_res = ((Y[te] - pred) ** 2).sum(axis=0)
            r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.where(ss_res > 0, 0.0, 1.0))
            scores[f, a] = r2.mean()
    mean_scores = scores.mean(axis=0)
    best_i = int(np.argmax(mean_scores))
    best = float(alphas[best_i])
    model = Pipeline(
        [
            ("scale", StandardScaler(with_std=bool(standardize))),
            ("pca", PCA(n_components=nc, svd_solver="full", random_state=seed)),
            ("ridge", Ridge(alpha=best)),
        ]
    ).fit(X, Y)
    if best in (float(np.min(alphas)), float(np.max(alphas))):
        logger.warning(f"ridge: alpha {best:g} is at the edge of the grid [{np.min(alphas):g}, {np.max(alphas):g}].")
    info = {
        "alpha": best,
        "n_components": nc,
        "cv_r2": float(mean_scores[best_i]),
        "cv_r2_per_alpha": np.asarray(mean_scores, dtype=float),
        "alphas": np.asarray(alphas, dtype=float),
        "n_train": int(len(X)),
        "n_cv_groups": int(n_groups),
        "n_cv_folds": len(splits),
    }
    return model, info


def _ridge_settings(p: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`_fit_ridge` from the method's parameters, checked (before any work).

    ``n_components`` an integer >= 1, ``cv`` an integer >= 2, ``alphas`` `None` or a non-empty sequence of finite
    numbers > 0 (with alpha 0 the closed-form CV divides 0 by 0 wherever the PCA scores are rank-deficient),
    ``standardize`` a bool.
    """
    n_components = check_method_option("ridge", "n_components", p["n_components"], integer=True, minimum=1)
    cv = check_method_option("ridge", "cv", p["cv"], integer=True, minimum=2)
    alphas = _check_alphas(p["alphas"])
    if not isinstance(p["standardize"], bool | np.bool_):
        msg = f"method 'ridge': standardize={p['standardize']!r} must be True or False."
        raise ValueError(msg)
    return {"n_components": n_components, "alphas": alphas, "cv": cv, "standardize": bool(p["standardize"])}


def _check_alphas(alphas: Any) -> np.ndarray:
    """The ridge penalties as a float array: `None` gives :data:`DEFAULT_ALPHAS`."""
    if alphas is None:
        return np.asarray(DEFAULT_ALPHAS, dtype=float)
    try:
        one_dim = not isinstance(alphas, str | bytes) and np.ndim(alphas) == 1
    except ValueError:  # ragged nesting
        one_dim = False
    if not one_dim:
        msg = f"method 'ridge': `alphas` must be a non-empty sequence of numbers > 0 (or None), got {alphas!r}."
        raise TypeError(msg)
    alphas = list(alphas)
    if not alphas:
        msg = "method 'ridge': `alphas` must be a non-empty sequence of numbers > 0 (or None), got an empty one."
        raise ValueError(msg)
    return np.asarray(
        [check_method_option("ridge", f"alphas[{i}]", a, minimum=0.0, strict=True) for i, a in enumerate(alphas)],
        dtype=float,
    )


def _ridge_fit(fctx: FitContext) -> dict[str, Any]:
    """Train on the labelled training samples (every measured spot), alpha by leave-sample-out CV."""
    p = _params(without_gene_rank(fctx.params), "ridge", RIDGE_DEFAULTS)
    settings = _ridge_settings(p)
    space = common_feature_space(fctx.train, p["features_key"], method="ridge")
    Xs, Ys, groups = [], [], []
    for g, c in enumerate(fctx.train):
        X = _features(c.table, p["features_key"], p["levels"])
        rows = c.known & _usable(X) & np.all(np.isfinite(c.Y), axis=1)
        Xs.append(X[rows])
        Ys.append(c.Y[rows])
        groups.append(np.full(int(rows.sum()), g) if len(fctx.train) > 1 else c.section_codes[rows])
    X, Y, grp = np.concatenate(Xs), np.concatenate(Ys), np.concatenate(groups)
    model, info = _fit_ridge(X, Y, grp, seed=fctx.seed, **settings)
    info["trained_on"] = "train_samples"
    return {"model": model, "info": info, "feature_id": space, "mean": Y.mean(axis=0)}


def _check_ridge_sample(table, params: dict[str, Any], table_key: str) -> None:
    """The features of a sample to impute, checked before the ridge is fitted on the training samples."""
    p = _params(without_gene_rank(params), "ridge", RIDGE_DEFAULTS)
    _ridge_settings(p)
    _features(table, p["features_key"], p["levels"])


@register_method("ridge", fit=_ridge_fit, check=_check_ridge_sample)
@gene_rank_option
def ridge_baseline(ctx: ImputeContext) -> ImputeResult:
    """Frozen features -> StandardScaler -> PCA -> ridge regression (method.md §7.3).

    With training samples (``impute(..., train=...)``) the model is fitted on them (alpha by leave-one-sample-out
    CV) and the known section is not used; without, it is fitted on the known spots, alpha chosen by CV over
    known sections (or over spatial blocks when one section is known). Scaler and PCA are fitted on training
    spots only.

    Parameters (``method_kwargs``): ``features_key`` (``"asign"``), ``levels`` (``["spot"]``; any of ``"spot"``,
    ``"region"``, ``"global"``, concatenated), ``n_components`` (256, an integer >= 1), ``alphas``
    (``logspace(-2, 6, 17)``; a non-empty sequence of finite numbers > 0), ``cv`` (5 folds at most, an integer
    >= 2), ``standardize`` (`True`: z-score every feature dimension; `False`: centre only, so near-constant
    dimensions are not amplified), ``gene_rank`` (`None`).
    """
    p = _params(ctx.params, "ridge", RIDGE_DEFAULTS)
    settings = _ridge_settings(p)
    X = _features(ctx.table, p["features_key"], p["levels"])
    ok = _usable(X)
    known = ctx.known & ok
    if ctx.fitted is not None:
        check_feature_space(ctx.fitted["feature_id"], ctx.table, p["features_key"], method="ridge", sample=ctx.sample)
        model, info, mean = ctx.fitted["model"], dict(ctx.fitted["info"]), ctx.fitted["mean"]
    else:
        if known.sum() < 3:
            msg = f"ridge: only {int(known.sum())} known spots have image features; need at least 3."
            raise ValueError(msg)
        codes = ctx.section_codes[known]
        if len(np.unique(codes)) > 1:
            groups, grouping = codes, "section"
        else:
            xy = np.asarray(ctx.table.obsm[Key.SPATIAL], dtype=np.float64)[known]
            groups, grouping = _spatial_groups(xy, settings["cv"], ctx.seed), "spatial_blocks"
        model, info = _fit_ridge(X[known], ctx.Y[known], groups, seed=ctx.seed, **settings)
        info["trained_on"] = "known_spots"
        info["cv_grouping"] = grouping
        mean = ctx.Y[known].mean(axis=0)
    pred = np.empty((ctx.n_obs, ctx.n_genes))
    if ok.any():
        pred[ok] = model.predict(X[ok])
    info["n_no_features"] = _fallback(pred, ~ok, mean, "ridge")
    info["levels"] = list(p["levels"])
    info["features_key"] = p["features_key"]
    info["standardize"] = bool(p["standardize"])
    logger.info(f"ridge: alpha={info['alpha']:g}, {info['n_components']} PCs, inner-CV R² {info['cv_r2']:.3f}.")
    return ImputeResult(imputed=pred, uns=info)


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(n > 0, n, 1.0)


def top_k_similar(Q: np.ndarray, K: np.ndarray, k: int, *, exclude: np.ndarray | None = None, block: int = 2048):
    """Indices ``(n_q, k)`` of the ``k`` rows of ``K`` with the highest cosine similarity to each row of ``Q``.

    ``exclude[i]`` (a row of ``K`` or -1) is never chosen for query ``i``. Ties go to the lower index.
    """
    Qn, Kn = _l2_normalise(Q), _l2_normalise(K)
    out = np.empty((len(Q), k), dtype=np.int64)
    for s in range(0, len(Q), block):
        sim = Qn[s : s + block] @ Kn.T
        if exclude is not None:
            ex = exclude[s : s + block]
            r = np.flatnonzero(ex >= 0)
            sim[r, ex[r]] = -np.inf
        if k < sim.shape[1]:
            # every row's k-th largest value; rows above it are in, and of the rows equal to it the lowest indices
            # fill the remaining places (argpartition alone picks among ties arbitrarily)
            thr = -np.partition(-sim, kth=k - 1, axis=1)[:, k - 1 : k]
            above = sim > thr
            tied = sim == thr
            room = k - above.sum(axis=1, keepdims=True)
            chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
            part = np.nonzero(chosen)[1].reshape(len(sim), k)
        else:
            part = np.tile(np.arange(sim.shape[1]), (len(sim), 1))
        vals = np.take_along_axis(sim, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


@register_method("similarity")
@gene_rank_option
def similarity_baseline(ctx: ImputeContext) -> ImputeResult:
    """Mean of the ``k`` known spots whose frozen image features are most cosine-similar (method.md §7.3).

    Known spots are predicted from the other known spots (leave-one-out), so their value is a genuine estimate.

    Parameters (``method_kwargs``): ``features_key`` (``"asign"``), ``levels`` (``["spot"]``), ``k`` (20, an
    integer >= 1), ``standardize`` (`False`; `True` z-scores each feature with the known spots' mean and sd before
    the cosine), ``gene_rank`` (`None`).
    """
    p = _params(ctx.params, "similarity", SIMILARITY_DEFAULTS)
    k_req = check_method_option("similarity", "k", p["k"], integer=True, minimum=1)
    X = _features(ctx.table, p["features_key"], p["levels"])
    ok = _usable(X)
    kidx = np.flatnonzero(ctx.known & ok)
    if kidx.size < 2:
        msg = f"similarity: only {kidx.size} known spots have image features; need at least 2."
        raise ValueError(msg)
    if p["standardize"]:
        mu, sd = X[kidx].mean(axis=0), X[kidx].std(axis=0)
        X = np.where(ok[:, None], (X - mu) / np.where(sd > 0, sd, 1.0), X)
    # unknown spots average up to every known spot; a known spot leaves itself out, so it has one fewer
    k = min(k_req, kidx.size)
    k_known = min(k_req, kidx.size - 1)
    if k < k_req:
        logger.warning(f"similarity: only {kidx.size} known spots with features; using k={k}.")
    Yk = ctx.Y[kidx]
    pred = np.empty((ctx.n_obs, ctx.n_genes))
    rows_u = np.flatnonzero(ok & ~ctx.known)
    if rows_u.size:
        pred[rows_u] = Yk[top_k_similar(X[rows_u], X[kidx], k)].mean(axis=1)
    pred[kidx] = Yk[top_k_similar(X[kidx], X[kidx], k_known, exclude=np.arange(kidx.size))].mean(axis=1)
    n_missing = _fallback(pred, ~ok, Yk.mean(axis=0), "similarity")
    return ImputeResult(
        imputed=pred,
        uns={
            "k": int(k),
            "k_known": int(k_known),
            "levels": list(p["levels"]),
            "features_key": p["features_key"],
            "n_no_features": n_missing,
        },
    )
