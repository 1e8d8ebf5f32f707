"""Build a section stack (one SpatialData object) from per-section parts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Key
from .._logging import logger
from .._stack import StackInfo

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

DEFAULT_SCALE_FACTORS = (2, 2, 2, 2)


@dataclass
class Section:
    """One serial section, in memory.

    Parameters
    ----------
    name
        Section name, unique in the stack (e.g. ``"C2"``).
    spots
        Spot centres ``(n, 2)`` as (x, y) in the section image's own pixels.
    counts
        Raw counts: an :class:`~anndata.AnnData` with one row per spot (in the order of ``spots``), a dense or
        sparse ``(n, genes)`` matrix (then ``genes`` is required), or `None` for a section without measured counts.
    image
        RGB image, ``(y, x, 3)`` or ``(3, y, x)`` uint8 array, a dask array, or an already parsed image element;
        `None` for a section without image.
    um_per_px
        Microns per image pixel.
    spot_ids
        Stable spot identifiers (default ``0..n-1``); ``obs_names`` become ``"<section>_<spot id>"``.
    genes
        Gene names when ``counts`` is a matrix.
    obs
        Extra per-spot columns.
    obsm
        Extra per-spot arrays (e.g. a published registration).
    """

    name: str
    spots: np.ndarray
    counts: Any = None
    image: Any = None
    um_per_px: float = 1.0
    spot_ids: Sequence[str] | None = None
    genes: Sequence[str] | None = None
    obs: pd.DataFrame | None = None
    obsm: dict[str, np.ndarray] = field(default_factory=dict)


def _parse_image(image: Any, coordinate_system: str, scale_factors: Sequence[int] | None):
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity
    from xarray import DataArray, DataTree

    if isinstance(image, DataArray | DataTree):
        return image
    arr = image
    if not isinstance(arr, da.Array):
        arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3:
        msg = f"image must be (y, x, c) or (c, y, x), got shape {arr.shape}"
        raise ValueError(msg)
    size = min(arr.shape[1:])
    sf = [f for f in (scale_factors or ())]
    # only keep pyramid levels that stay above 256 px
    keep, s = [], 1
    for f in sf:
        if size // (s * f) < 256:
            break
        keep.append(f)
        s *= f
    chunks = (arr.shape[0], 1024, 1024)
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        scale_factors=keep or None,
        chunks=chunks,
        transformations={coordinate_system: Identity()},
    )


def _counts_to_anndata(sec: Section) -> AnnData | None:
    from anndata import AnnData

    if sec.counts is None:
        return None
    if isinstance(sec.counts, AnnData):
        return sec.counts
    X = sec.counts
    if sec.genes is None:
        msg = f"Section {sec.name!r}: `counts` is a matrix, so `genes` must name its columns."
        raise ValueError(msg)
    return AnnData(X=sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr(), var=pd.DataFrame(index=list(sec.genes)))


def _from_spatialdata(sdata: SpatialData, name: str | None, um_per_px: float | None) -> Section:
    """Turn a single-section SpatialData (e.g. spatialdata-io's Visium reader) into a :class:`Section`."""
    from spatialdata import get_extent
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    circles = [k for k, v in sdata.shapes.items() if "radius" in v.columns]
    if len(circles) != 1:
        msg = f"Expected exactly one circles shapes element per section SpatialData, found {circles}."
        raise ValueError(msg)
    shapes_key = circles[0]
    shapes = sdata.shapes[shapes_key]
    tables = [t for t in sdata.tables.values() if shapes_key in np.atleast_1d(get_table_keys(t)[0])]
    if len(tables) != 1:
        msg = f"Expected one table annotating shapes {shapes_key!r}, found {len(tables)}."
        raise ValueError(msg)
    table = tables[0]
    _, region_key, instance_key = get_table_keys(table)
    # the highest-resolution image (largest extent in pixels)
    image_key = None
    if sdata.images:
        image_key = max(sdata.images, key=lambda k: np.prod(_image_shape(sdata.images[k])))
    xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    radius = shapes["radius"].to_numpy()
    if image_key is not None:
        # express spot centres in the image's pixel frame
        t = get_transformation_between_coordinate_systems(sdata, shapes, sdata.images[image_key])
        m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        xy = xy @ m[:2, :2].T + m[:2, 2]
        radius = radius * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        image = sdata.images[image_key]
        image = _highest_level(image)
    else:
        image = None
        _ = get_extent
    rows = table[table.obs[region_key] == shapes_key]
    order = pd.Index(rows.obs[instance_key].to_numpy()).get_indexer(shapes.index.to_numpy())
    if (order < 0).any():
        msg = f"Table does not annotate every spot of {shapes_key!r}."
        raise ValueError(msg)
    adata = rows[order].copy()
    spot_ids = [str(i) for i in rows.obs_names[order]]
    name = name or shapes_key
    if um_per_px is None:
        msg = f"Section {name!r}: pass `um_per_px` for SpatialData inputs (pixel size is not stored in the object)."
        raise ValueError(msg)
    return Section(
        name=name,
        spots=xy,
        counts=adata,
        image=image,
        um_per_px=um_per_px,
        spot_ids=spot_ids,
        obs=pd.DataFrame({"spot_radius_px": radius}, index=spot_ids),
    )


def _image_shape(image) -> tuple[int, ...]:
    return tuple(_highest_level(image).shape)


def _highest_level(image):
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].values()))
    return image


def stack_sections(
    sections: Sequence[Section | SpatialData],
    *,
    names: Sequence[str] | None = None,
    spot_diameter_um: float = 100.0,
    thickness_um: float = 16.0,
    z_um: Sequence[float] | None = None,
    um_per_px: float | Sequence[float] | None = None,
    scale_factors: Sequence[int] | None = DEFAULT_SCALE_FACTORS,
    table_key: str = Key.TABLE,
    validate: bool = True,
) -> SpatialData:
    """Build a valid section stack from per-section parts.

    Parameters
    ----------
    sections
        The sections in cutting order: :class:`asign.io.Section` objects (images, spot centres and counts in
        memory), or single-section :class:`spatialdata.SpatialData` objects such as spatialdata-io's Visium reader
        returns (one circles shapes element, the table annotating it, the highest-resolution image).
    names
        Section names for :class:`~spatialdata.SpatialData` inputs (default: the shapes element's name).
    spot_diameter_um
        Physical spot diameter in µm (ST: 100, Visium: 55).
    thickness_um
        Section thickness: section ``i`` (0-based) gets ``z = i * thickness_um`` unless ``z_um`` is given.
    z_um
        Explicit z position of every section in µm.
    um_per_px
        Pixel size for :class:`~spatialdata.SpatialData` inputs (one value or one per section).
    scale_factors
        Pyramid downscale factors for in-memory images (levels below 256 px are dropped).
    table_key
        Key of the table written.
    validate
        Run :func:`asign.io.validate_stack` on the result.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with images ``he_<section>``, circles ``spots_<section>`` and one table
    ``table_key`` with ``obs['section']``, ``obs['measured']``, ``obs['region']``, ``obs['spot_id']``,
    ``obsm['spatial']``, raw counts in ``.X`` and the manifest ``uns['asign']['stack']``.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    if len(sections) == 0:
        msg = "stack_sections needs at least one section."
        raise ValueError(msg)
    ums = um_per_px if isinstance(um_per_px, Sequence) else [um_per_px] * len(sections)
    secs: list[Section] = []
    for i, s in enumerate(sections):
        if isinstance(s, Section):
            secs.append(s)
        else:
            secs.append(_from_spatialdata(s, None if names is None else names[i], ums[i]))
    sec_names = [s.name for s in secs]
    dup = sorted({n for n in sec_names if sec_names.count(n) > 1})
    if dup:
        msg = f"Duplicate section names {dup}; every section needs a unique name."
        raise ValueError(msg)
    if z_um is None:
        z = np.arange(len(secs), dtype=float) * float(thickness_um)
    else:
        z = np.asarray(z_um, dtype=float)
        if z.shape != (len(secs),):
            msg = f"z_um has {z.size} values for {len(secs)} sections."
            raise ValueError(msg)

    images, shapes, tables = {}, {}, []
    image_keys: list[str | None] = []
    genes: pd.Index | None = None
    adatas = []
    for s in secs:
        cs = s.name
        spots = np.asarray(s.spots, dtype=float).reshape(-1, 2)
        n = spots.shape[0]
        ids = [str(i) for i in (s.spot_ids if s.spot_ids is not None else range(n))]
        if len(ids) != n:
            msg = f"Section {s.name!r}: {len(ids)} spot ids for {n} spots."
            raise ValueError(msg)
        radius_px = 0.5 * spot_diameter_um / float(s.um_per_px)
        skey = Key.shapes(s.name)
        shapes[skey] = ShapesModel.parse(
            spots,
            geometry=0,
            radius=np.full(n, radius_px),
            index=pd.RangeIndex(n),
            transformations={cs: Identity()},
        )
        if s.image is not None:
            ikey = Key.image(s.name)
            images[ikey] = _parse_image(s.image, cs, scale_factors)
            image_keys.append(ikey)
        else:
            image_keys.append(None)
        a = _counts_to_anndata(s)
        if a is not None and a.n_obs != n:
            msg = f"Section {s.name!r}: counts have {a.n_obs} rows for {n} spots."
            raise ValueError(msg)
        adatas.append((s, a, ids, spots, skey))
        if a is not None:
            genes = a.var_names if genes is None else genes.union(a.var_names, sort=False)
    if genes is None:
        genes = pd.Index([])
    # one gene axis for all sections; a gene missing from a section is 0 there (and recorded in var)
    blocks, obs_frames, obsm_extra = [], [], {}
    present = pd.DataFrame(False, index=genes, columns=sec_names)
    for s, a, ids, spots, skey in adatas:
        n = spots.shape[0]
        if a is None:
            blocks.append(sp.csr_matrix((n, len(genes)), dtype=np.float32))
        else:
            X = a.layers[Key.COUNTS] if Key.COUNTS in a.layers else a.X
            X = sp.csr_matrix(X, dtype=np.float32)
            idx = genes.get_indexer(a.var_names)
            M = sp.csr_matrix((np.ones(len(idx), dtype=np.float32), (np.arange(len(idx)), idx)), shape=(len(idx), len(genes)))
            blocks.append((X @ M).tocsr())
            present.loc[a.var_names, s.name] = True
        obs = pd.DataFrame(
            {
                Key.SECTION: s.name,
                Key.MEASURED: a is not None,
                Key.REGION: skey,
                Key.INSTANCE: np.arange(n, dtype=np.int64),
                Key.BARCODE: ids,
            },
            index=[f"{s.name}_{i}" for i in ids],
        )
        if s.obs is not None:
            extra = s.obs.reset_index(drop=True)
            extra.index = obs.index
            obs = obs.join(extra.drop(columns=[c for c in extra.columns if c in obs.columns]))
        obs_frames.append(obs)
        for k, v in s.obsm.items():
            obsm_extra.setdefault(k, []).append((s.name, np.asarray(v, dtype=float)))
    obs = pd.concat(obs_frames)
    obs[Key.SECTION] = pd.Categorical(obs[Key.SECTION], categories=sec_names, ordered=True)
    obs[Key.REGION] = pd.Categorical(obs[Key.REGION], categories=[Key.shapes(n) for n in sec_names])
    X = sp.vstack(blocks).tocsr()
    var = pd.DataFrame(index=genes)
    var["n_sections_measured"] = present.sum(axis=1).to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[Key.SPATIAL] = np.vstack([a[3] for a in adatas])
    for k, parts in obsm_extra.items():
        full = np.full((adata.n_obs, parts[0][1].shape[1]), np.nan)
        for name, v in parts:
            full[(obs[Key.SECTION] == name).to_numpy()] = v
        obsm_extra[k] = full
        adata.obsm[k] = full
    stack = StackInfo(
        sections=sec_names,
        shapes_keys=[Key.shapes(n) for n in sec_names],
        image_keys=image_keys,
        coordinate_systems=sec_names,
        z_um=z,
        um_per_px=np.array([float(s.um_per_px) for s in secs]),
        spot_diameter_um=float(spot_diameter_um),
    )
    adata.uns[Key.UNS] = {Key.STACK: stack.to_uns()}
    table = TableModel.parse(adata, region=stack.shapes_keys, region_key=Key.REGION, instance_key=Key.INSTANCE)
    sdata = SpatialData(images=images, shapes=shapes, tables={table_key: table})
    logger.info(f"Stacked {len(secs)} sections, {adata.n_obs} spots, {adata.n_vars} genes.")
    if validate:
        from ._validate import validate_stack

        validate_stack(sdata, table_key=table_key)
    return sdata
