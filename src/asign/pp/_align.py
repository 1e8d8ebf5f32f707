"""Serial-section alignment: one rigid (or similarity / affine) map per section into a shared frame.

The shared frame (coordinate system ``key_added``, default ``"aligned"``) is the native pixel frame of the reference
section. Every element of a section (its image and spots, and any other element in the section's native coordinate
system only) gets a transformation to it, composed (``Sequence``) after its existing transformation to the
section's native coordinate system; spot positions in microns go to the table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from asign._checks import check_number
from asign._constants import Key
from asign._docs import inject_docs
from asign._logging import logger
from asign._stack import StackInfo, get_table, section_masks

if TYPE_CHECKING:
    from spatialdata import SpatialData

TRANSFORM_TYPES = ("rigid", "similarity", "affine")
METHODS = ("ants", "transforms", "landmarks")


# --------------------------------------------------------------------------------------------------------------------
# reference, neighbours, composition
# --------------------------------------------------------------------------------------------------------------------
def default_reference(sections: Sequence[str]) -> str:
    """The middle section, ``m = floor(S / 2) + 1`` in 1-based cutting order (the later one for even ``S``)."""
    return sections[len(sections) // 2]


def registration_pairs(sections: Sequence[str], reference: str) -> list[tuple[str, str]]:
    """``(moving, fixed)`` pairs of consecutive sections, each registered onto its neighbour towards the reference.

    Ordered outwards from the reference, so that composing them in order gives every section's map.
    """
    m = list(sections).index(reference)
    pairs = []
    for i in range(m - 1, -1, -1):
        pairs.append((sections[i], sections[i + 1]))
    for i in range(m + 1, len(sections)):
        pairs.append((sections[i], sections[i - 1]))
    return pairs


def compose_to_reference(pairwise: Mapping[tuple[str, str], np.ndarray], sections: Sequence[str], reference: str):
    """``T_s = T_{s'} A_{s -> s'}`` outwards from the reference (``T_ref = I``)."""
    T = {reference: np.eye(3)}
    for moving, fixed in registration_pairs(sections, reference):
        T[moving] = T[fixed] @ np.asarray(pairwise[(moving, fixed)], dtype=float)
    return T


def relative_to_reference(transforms: Mapping[str, Any], reference: str) -> dict[str, np.ndarray]:
    """Re-express maps ``B_s`` into any common frame relative to the reference: ``T_s = B_ref^{-1} B_s``.

    If the reference has no matrix, the maps are taken as already relative to it (``T_ref = I``).
    """
    out = {str(s): _check_matrix(M, str(s)) for s, M in transforms.items()}
    if reference in out:
        inv = np.linalg.inv(out[reference])
        out = {s: inv @ M for s, M in out.items()}
        out[reference] = np.eye(3)
    else:
        out[reference] = np.eye(3)
    return out


def classify_transforms(transforms: Mapping[str, np.ndarray], tol: float = 1e-3) -> str:
    """The narrowest of ``"rigid"``, ``"similarity"`` and ``"affine"`` that describes every matrix.

    A mirror (negative determinant) is neither rigid nor a similarity in the sense of the registration (ANTs' rigid
    and similarity maps keep the orientation): ``"affine"``.
    """
    kind = "rigid"
    for M in transforms.values():
        L = np.asarray(M, dtype=float)[:2, :2]
        sv = np.linalg.svd(L, compute_uv=False)
        if abs(sv[0] - sv[1]) > tol * sv[0] or np.linalg.det(L) < 0:
            return "affine"
        if abs(sv[0] - 1.0) > tol:
            kind = "similarity"
    return kind


def _check_matrix(M: Any, section: str) -> np.ndarray:
    A = np.asarray(M, dtype=float)
    if A.shape == (2, 3):
        A = np.vstack([A, [0.0, 0.0, 1.0]])
    if A.shape != (3, 3):
        msg = f"Section {section!r}: a transform must be a 3 x 3 (or 2 x 3) homogeneous matrix, got shape {A.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(A)):
        msg = f"Section {section!r}: the transform has non-finite entries."
        raise ValueError(msg)
    if not np.allclose(A[2], [0.0, 0.0, 1.0]):
        msg = f"Section {section!r}: the last row of the transform must be [0, 0, 1] (a 2D affine map), got {A[2]}."
        raise ValueError(msg)
    if abs(np.linalg.det(A[:2, :2])) < 1e-12:
        msg = f"Section {section!r}: the transform is singular (determinant 0)."
        raise ValueError(msg)
    return A


# --------------------------------------------------------------------------------------------------------------------
# writing the result
# --------------------------------------------------------------------------------------------------------------------
def classify_in_microns(transforms: Mapping[str, np.ndarray], stack: StackInfo, reference: str) -> str:
    """:func:`classify_transforms` of the maps ``T_s`` expressed in microns.

    ``T_s`` maps section ``s``'s native pixels to the reference's; in microns it is
    ``diag(um_ref) T_s diag(1 / um_s)``, so a rigid alignment of sections stored at different pixel sizes is
    recorded as rigid.
    """
    u_ref = float(stack.um_per_px[stack.index(reference)])
    um = {
        s: np.diag([u_ref, u_ref, 1.0])
        @ np.asarray(M, dtype=float)
        @ np.diag([1.0 / float(stack.um_per_px[stack.index(s)])] * 2 + [1.0])
        for s, M in transforms.items()
    }
    return classify_transforms(um)


def _section_elements(sdata: SpatialData, stack: StackInfo) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The spatial elements of each section, and those that belong to several sections.

    A section's elements are its shapes and image of the manifest, and every other spatial element (images,
    labels, points, shapes) that has a transformation to the section's native coordinate system and to no other
    section's. Returns ``({section: [element names]}, {element name: [sections]})``, the latter for the elements
    with transformations to the native coordinate systems of several sections.
    """
    from spatialdata.transformations import get_transformation

    by_cs: dict[str, list[str]] = {}
    for s in stack.sections:
        by_cs.setdefault(stack.coordinate_system(s), []).append(s)
    owned: dict[str, list[str]] = {s: [stack.shapes_key(s)] for s in stack.sections}
    manifest = {stack.shapes_key(s) for s in stack.sections}
    for s in stack.sections:
        ikey = stack.image_key(s)
        if ikey is not None and ikey in sdata.images:
            owned[s].append(ikey)
            manifest.add(ikey)
    shared: dict[str, list[str]] = {}
    for _, name, el in sdata.gen_spatial_elements():
        if name in manifest:
            continue
        secs = {sec for cs in get_transformation(el, get_all=True) for sec in by_cs.get(cs, ())}
        if len(secs) == 1:
            owned[secs.pop()].append(name)
        elif len(secs) > 1:
            shared[name] = [sec for sec in stack.sections if sec in secs]
    return owned, shared


def _native_matrix(element, coordinate_system: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _shape_centres(shapes) -> np.ndarray:
    return np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()]).astype(float)


def _to_uns(value: Any) -> Any:
    """Make a value zarr-writable (no None, no tuples)."""
    if isinstance(value, Mapping):
        return {str(k): _to_uns(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple | list):
        return [_to_uns(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_key_added(stack, key_added: str) -> None:
    """``key_added`` must name a new coordinate system: a section's own one holds its native transformations."""
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added={key_added!r} must be a non-empty string (the coordinate system to write)."
        raise TypeError(msg)
    own = [s for s in stack.sections if stack.coordinate_system(s) == key_added]
    if own:
        msg = (
            f"key_added={key_added!r} is the native coordinate system of section(s) {own}; writing the alignment "
            "there would replace their native transformations. Choose another name (default 'aligned')."
        )
        raise ValueError(msg)


def _recorded_keys(table) -> list[str] | None:
    """The coordinate systems that asign's alignments of this stack wrote (the latest last); `None` without a record."""
    record = table.uns.get(Key.UNS, {}).get(Key.ALIGNMENT) if isinstance(table.uns.get(Key.UNS), Mapping) else None
    if not isinstance(record, Mapping):
        return None
    keys = [str(k) for k in np.atleast_1d(record.get("keys_added", [])).tolist() if str(k)]
    latest = str(record.get("key_added", Key.ALIGNED))
    return [k for k in keys if k != latest] + [latest]


def _check_not_users(sdata: SpatialData, table, key_added: str, table_key: str) -> None:
    """Refuse to replace a coordinate system or table keys that asign did not write (the user's own).

    ``key_added`` may exist on elements only if an earlier asign alignment recorded in the table wrote it
    (``uns['asign']['alignment']['key_added']`` or ``['keys_added']``); ``obs['z']``, ``obsm['spatial_aligned']`` and
    ``obsm['spatial_3d']`` may exist only if the table records an asign alignment.
    """
    from spatialdata.transformations import get_transformation

    recorded = _recorded_keys(table)
    if key_added not in (recorded or []):
        carriers = [
            name for _, name, el in sdata.gen_spatial_elements() if key_added in get_transformation(el, get_all=True)
        ]
        if carriers:
            had = (
                "records no asign alignment (`uns['asign']['alignment']`)"
                if recorded is None
                else f"records asign alignments under {recorded} only (`uns['asign']['alignment']`)"
            )
            msg = (
                f"Elements {carriers} already have a coordinate system {key_added!r}, and table {table_key!r} {had}: "
                f"it is not asign's (e.g. a manual alignment) and align_layers would replace it. Choose another "
                f"`key_added=`, or remove {key_added!r} from those elements first "
                "(`spatialdata.transformations.remove_transformation`)."
            )
            raise ValueError(msg)
    if recorded is None:
        found = [f"obs['{Key.Z}']"] if Key.Z in table.obs.columns else []
        found += [f"obsm['{k}']" for k in (Key.SPATIAL_ALIGNED, Key.SPATIAL_3D) if k in table.obsm]
        if found:
            msg = (
                f"Table {table_key!r} already has {', '.join(found)}, which align_layers writes (fixed names), but "
                "records no asign alignment (`uns['asign']['alignment']`): they are not asign's and would be "
                f"replaced. Remove or rename them first (e.g. `table.obs.rename(columns={{'{Key.Z}': 'my_z'}})`, "
                f"`table.obsm['my_3d'] = table.obsm.pop('{Key.SPATIAL_3D}')`)."
            )
            raise ValueError(msg)


def set_alignment(
    sdata: SpatialData,
    transforms: Mapping[str, Any],
    *,
    reference: str,
    table_key: str = Key.TABLE,
    key_added: str = Key.ALIGNED,
    method: str = "transforms",
    transform: str | None = None,
    quality: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Write an alignment given as one matrix per section.

    Parameters
    ----------
    sdata
        A section stack.
    transforms
        ``{section: 3 x 3 matrix}`` mapping each section's native pixels into a common frame. If the reference is
        among them, the maps are re-expressed relative to it (``T_s = B_ref^{-1} B_s``), so the aligned frame is
        always the reference's native pixel frame; otherwise they are taken as relative to the reference already.
        Sections without a matrix get no transformation and NaN positions (with a warning).
    reference
        The reference section (its native pixels are the aligned frame).
    table_key
        Key of the table that annotates the spots of all sections.
    key_added
        Name of the coordinate system written.
    method
        Recorded in ``uns['asign']['alignment']['method']``.
    transform
        Recorded as the transform type (``"rigid"``, ``"similarity"`` or ``"affine"``); default: the narrowest type
        that describes every map in microns (:func:`classify_in_microns`; a mirror is ``"affine"``).
    quality
        Per-pair quality figures to record (columns of equal length: ``pair``, ``dice_before``, ...).
    params
        Further parameters to record.

    Returns
    -------
    Nothing; modifies ``sdata`` in memory only (nothing is written to disk, also when ``sdata`` is backed by a zarr
    store: :func:`asign.io.persist` writes the results):

    - for every element of an aligned section (its image and shapes, and every other spatial element with a
      transformation to the section's native coordinate system and to no other section's), a transformation to
      ``key_added``: ``Sequence([<transformation to the native coordinate system>, Affine(T_s)])`` (``Identity()``
      for the reference); other transformations are kept. The elements of the sections not aligned lose their
      transformation to ``key_added`` (from an earlier run), so ``key_added`` holds this alignment only. Elements
      with transformations to several sections' native coordinate systems are left alone, with a warning;
    - ``table.obsm['spatial_aligned']``: spot centres (x, y) in µm in ``key_added`` (NaN for sections not aligned);
    - ``table.obs['z']``: section z in µm; ``table.obsm['spatial_3d']``: (x, y, z) in µm;
    - ``table.uns['asign']['alignment']``: ``reference``, ``method``, ``transform``, ``key_added``, ``keys_added``
      (every ``key_added`` that asign's alignments of this stack wrote, this one last), ``um_per_px``, ``sections``,
      ``transforms`` ({section: T_s}), ``quality`` and ``params``.

    Raises
    ------
    ValueError
        Before any change, if ``key_added`` is a coordinate system of some element that no earlier asign alignment
        recorded in the table wrote (``uns['asign']['alignment']['key_added']`` / ``['keys_added']``), e.g. a manual
        alignment; or if the table has ``obs['z']``, ``obsm['spatial_aligned']`` or ``obsm['spatial_3d']`` but
        records no asign alignment (the user's own keys). The message names the elements or keys.
    """
    from spatialdata.transformations import Affine, Identity, get_transformation
    from spatialdata.transformations import Sequence as TSequence

    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    _check_key_added(stack, key_added)
    _check_not_users(sdata, get_table(sdata, table_key), key_added, table_key)
    if reference not in stack.sections:
        msg = f"Unknown reference section {reference!r}; the stack has sections {stack.sections}."
        raise KeyError(msg)
    unknown = [s for s in transforms if str(s) not in stack.sections]
    if unknown:
        msg = f"Transforms given for unknown sections {unknown}; the stack has sections {stack.sections}."
        raise KeyError(msg)
    T = relative_to_reference(transforms, reference)
    if transform is None:
        transform = classify_in_microns(T, stack, reference)
    table = get_table(sdata, table_key)
    missing = [s for s in stack.sections if s not in T]
    owned, shared = _section_elements(sdata, stack)

    # build every new transformation first, so that a problem leaves the object untouched
    updates, stale = [], []
    for s in stack.sections:
        cs = stack.coordinate_system(s)
        for name in owned[s]:
            el = sdata[name]
            if s not in T:
                # a map to key_added of an earlier run (of any key_added history) would place the section wrongly
                if key_added in get_transformation(el, get_all=True):
                    stale.append(name)
                continue
            native = _native_transformation(el, cs, name)
            step = Identity() if s == reference else Affine(T[s], input_axes=("x", "y"), output_axes=("x", "y"))
            updates.append((name, TSequence([native, step])))
    for name, t in updates:
        _set_transformation(sdata[name], t, key_added)
    for name in stale:
        _remove_transformation(sdata[name], key_added)
    if shared:
        listed = ", ".join(f"{n!r} ({', '.join(secs)})" for n, secs in shared.items())
        logger.warning(
            f"Elements {listed} have transformations to the native coordinate systems of several sections; they are "
            f"left alone (no transformation to {key_added!r} added or removed)."
        )

    # spot positions in microns, in table order (rows follow the shapes index within each section)
    um = float(stack.um_per_px[stack.index(reference)])
    masks = section_masks(table, stack)
    xy = np.full((table.n_obs, 2), np.nan)
    z = np.zeros(table.n_obs)
    for i, s in enumerate(stack.sections):
        rows = masks[s]
        z[rows] = float(stack.z_um[i])
        if s not in T:
            continue
        shapes = sdata.shapes[stack.shapes_key(s)]
        M = T[s] @ _native_matrix(shapes, stack.coordinate_system(s))
        p = _shape_centres(shapes)
        xy[rows] = (p @ M[:2, :2].T + M[:2, 2]) * um
    table.obsm[Key.SPATIAL_ALIGNED] = xy
    table.obs[Key.Z] = z
    table.obsm[Key.SPATIAL_3D] = np.column_stack([xy, z])
    result = {
        "reference": str(reference),
        "method": str(method),
        "transform": str(transform),
        "key_added": str(key_added),
        "keys_added": [k for k in (_recorded_keys(table) or []) if k != key_added] + [str(key_added)],
        "um_per_px": um,
        "sections": [s for s in stack.sections if s in T],
        "transforms": {s: np.asarray(T[s], dtype=float) for s in stack.sections if s in T},
        "quality": _to_uns(dict(quality or {})),
        "params": _to_uns(dict(params or {})),
    }
    table.uns.setdefault(Key.UNS, {})
    table.uns[Key.UNS][Key.ALIGNMENT] = result
    if missing:
        removed = f" (removed from {stale}, written by an earlier run)" if stale else ""
        logger.warning(
            f"Sections {missing} were not aligned: they have no transformation to {key_added!r}{removed} and NaN in "
            f"`obsm['{Key.SPATIAL_ALIGNED}']`."
        )
    logger.info(
        f"Adding transformations to {key_added!r}, `obsm['{Key.SPATIAL_ALIGNED}']`, `obs['{Key.Z}']`, "
        f"`obsm['{Key.SPATIAL_3D}']` and `uns['{Key.UNS}']['{Key.ALIGNMENT}']` (reference {reference!r})."
    )
    if sdata.path is not None:
        logger.info(
            f"The alignment is in memory only (nothing is written to {sdata.path}); `asign.io.persist(sdata)` "
            f"writes it (the table {table_key!r} and the transformations)."
        )


def _native_transformation(el, cs: str, name: str):
    from spatialdata.transformations import get_transformation

    ts = get_transformation(el, get_all=True)
    if cs not in ts:
        msg = (
            f"Element {name!r} has no transformation to its section's native coordinate system {cs!r} "
            f"(it has {sorted(ts)}); fix the manifest's `native_coordinate_system`."
        )
        raise ValueError(msg)
    return ts[cs]


def _set_transformation(el, transformation, cs: str) -> None:
    from spatialdata.transformations import set_transformation

    set_transformation(el, transformation, to_coordinate_system=cs)


def _remove_transformation(el, cs: str) -> None:
    from spatialdata.transformations import get_transformation, set_transformation

    ts = dict(get_transformation(el, get_all=True))
    if cs in ts:
        del ts[cs]
        set_transformation(el, ts, set_all=True)


# --------------------------------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------------------------------
@inject_docs()
def align_layers(
    sdata: SpatialData,
    *,
    reference: str | None = None,
    transform: Literal["rigid", "similarity", "affine"] = "rigid",
    method: Literal["ants", "transforms", "landmarks"] = "ants",
    sections: Sequence[str] | None = None,
    key_added: str = Key.ALIGNED,
    transforms: Mapping[str, Any] | None = None,
    mirror: bool = False,
    landmarks: Mapping[str, Any] | None = None,
    target_size: int = 1000,
    min_dice: float = 0.8,
    rotation_step: float = 10.0,
    max_scale_ratio: float = 1.5,
    pairs: Literal["adjacent", "second"] = "adjacent",
    table_key: str = Key.TABLE,
    inplace: bool = True,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> dict[str, Any] | None:
    """Align serial sections into one coordinate system from their H&E images.

    Consecutive sections are registered pairwise, each onto its neighbour towards the reference, and the pairwise
    maps are composed towards the reference (so errors do not accumulate from one end of the stack); with
    ``pairs="second"`` every section is also registered onto its second neighbour and the maps come from a pose graph
    that reconciles all pairs:

    1. both images are read from the pyramid level closest above the working resolution (longer side about
       ``target_size`` px; a level finer than that by a factor of 2 or more, such as a single-scale image, is first
       reduced lazily by block means, never read whole) and resampled to one physical pixel size, as grey scale with
       tissue bright; tissue masks
       come from Otsu's threshold;
    2. coarse start: the mask centroids are matched and rotations in ``rotation_step`` steps over 360° are tried
       (and mirror images if ``mirror``), keeping the best mask Dice (user ``landmarks`` replace this search). When
       a tissue mask runs along its image's border (a partial section, whose piece fits in several places of the
       other mask), starts shifted to the largest mask overlap and to the best correlation of the grey images
       within the tissue overlap join the search, every start is refined, and among the results within 0.1 of the
       best Dice the one whose grey images correlate best over the tissue overlap is kept;
    3. refinement with ANTs (:func:`ants.registration`, ``"Rigid"``, ``"Similarity"`` or ``"Affine"``,
       single-threaded with a fixed seed); it is kept only if it does not lower the mask Dice of the start;
    4. the map is converted to full-resolution pixels and composed towards the reference; or, with
       ``pairs="second"``, the section maps ``T_s`` minimise ``sum w_mf mean_p |T_m p - T_f A_mf p|^2`` over all
       registered pairs ``A_mf`` and the moving section's tissue points ``p`` (weights ``w = 1 / max(1 - Dice,
       0.005)`` from each pair's tissue-mask Dice), so a pair that disagrees with the others is outvoted.

    Expression and any published registration are never read.

    Parameters
    ----------
    {sdata}
    reference
        The reference section; default: the middle one (``floor(S / 2) + 1`` in 1-based cutting order, the later of
        the two for an even count), among ``sections``.
    transform
        ``"rigid"`` (default: serial sections of one block keep their scale), ``"similarity"`` or ``"affine"``;
        rigid maps keep physical lengths (microns), also between sections stored at different pixel sizes. Not used
        with ``method="transforms"`` (the matrices are taken as given).
    method
        ``"ants"`` (image registration), ``"transforms"`` (the matrices in ``transforms``) or ``"landmarks"``
        (pairwise fits of ``landmarks`` only).
    sections
        Sections to align, in cutting order (default: all). Spots of the others get NaN positions and a warning.
    key_added
        Name of the coordinate system written. The table keys (``obsm['spatial_aligned']``, ``obs['z']``,
        ``obsm['spatial_3d']``, ``uns['asign']['alignment']``) have fixed names and hold the latest alignment,
        whatever its ``key_added``; :func:`asign.pp.neighbors_3d` and the methods of :func:`asign.tl.impute` read
        them. Another ``key_added`` keeps the earlier run's coordinate system on the elements, not its table keys.
    transforms
        For ``method="transforms"``: ``{{section: 3 x 3}}`` maps of native pixels into any common frame; they are
        re-expressed relative to the reference (``T_s = B_ref^{{-1}} B_s``).
    mirror
        Also try mirror images in the coarse search (sections mounted face down, i.e. mirrored, on the slide).
        Rotations of any angle are always searched, but a mirrored section is not found without ``mirror=True``: it
        is then aligned wrongly, possibly with a high tissue-mask Dice. Check the result with
        :func:`asign.pl.alignment`.
    landmarks
        ``{{section: (n, 2) array}}`` of corresponding points (x, y in the section's native pixels; row ``k`` of every
        section is the same anatomical point). For a pair whose two sections both have landmarks, the fitted map
        replaces the coarse search (``method="ants"``) or is the answer (``method="landmarks"``).
    target_size
        Longer side of the working images in pixels.
    min_dice
        Warn about every pair whose tissue-mask Dice after alignment is below this.
    rotation_step
        Step of the coarse rotation search in degrees.
    max_scale_ratio
        With ``transform="rigid"``, raise an error if the tissue of two consecutive sections differs in linear size
        by more than this factor: the pixel sizes in the manifest are then probably wrong.
    pairs
        ``"adjacent"``: register consecutive sections and compose the maps; ``"second"``: register every section also
        onto its second neighbour and solve the pose graph (about twice the time).
    {table_key}
    {inplace}
    {seed}
    {show_progress_bar}

    Returns
    -------
    If ``inplace = False``, the alignment as a dict (the content of ``uns['asign']['alignment']``: ``transforms``
    ``{{section: 3 x 3 matrix T_s}}`` from native to aligned pixels, ``quality``, ``params``, ...) and ``sdata`` is
    left untouched. Otherwise `None`, and ``sdata`` gets:

    - a transformation to ``key_added`` on every element of an aligned section, composed after the existing one to
      the section's native coordinate system (existing transformations are kept). A section's elements are its
      image and shapes in the manifest and every other spatial element (a points element, another image, labels)
      with a transformation to the section's native coordinate system and to no other section's; elements with
      transformations to several sections' native coordinate systems are left alone, with a warning naming them.
      The elements of the sections not aligned lose any transformation to ``key_added`` (from an earlier run);
    - ``table.obsm['spatial_aligned']`` (x, y in µm in ``key_added``), ``table.obs['z']`` (µm) and
      ``table.obsm['spatial_3d']`` (x, y, z in µm);
    - ``table.uns['asign']['alignment']`` with ``reference``, ``method``, ``transform`` (the narrowest of
      ``"rigid"``, ``"similarity"`` and ``"affine"`` that describes every map ``T_s`` in microns; a mirror is
      ``"affine"``; the requested type is ``params['transform']``, absent for ``method="transforms"``),
      ``key_added``, ``keys_added`` (every ``key_added`` that asign's alignments of this stack wrote, this one
      last), ``um_per_px``, ``sections``, ``transforms``, ``quality`` and ``params``. ``quality`` holds
      one entry per registered pair (moving section -> its neighbour towards the reference) in columns ``pair``,
      ``moving``, ``fixed``, ``start``, ``dice_before`` / ``dice_after`` (tissue-mask Dice with the sections as
      placed on their slides / after alignment), ``nmi_before`` / ``nmi_after`` (normalised mutual information of
      the grey images), ``dice_start`` (of the coarse start), ``refined`` (whether the ANTs result was kept),
      ``rotation_deg``, ``scale``, ``anisotropy``, ``mirrored`` and ``passed`` (``dice_after >= min_dice``); for
      given transforms and landmarks the figures are computed from the images too (NaN where a section has none).
      With ``pairs="second"`` the consecutive pairs' ``dice_after``, ``nmi_after``, ``rotation_deg``, ... describe
      the maps returned (``T_fixed^{{-1}} T_moving``), ``dice_pair`` / ``nmi_pair`` the pair's own registration
      and ``residual_um`` the median distance between the two (µm); ``params['pose_graph']`` has the same figures
      for every registered pair (columns ``pair``, ``kind``, ``weight``, ``dice_pair``, ``nmi_pair``,
      ``dice_final``, ``nmi_final``, ``residual_um``). ``params`` holds the options, the working pixel size and the
      run time.

    Nothing is written to disk, also when ``sdata`` is backed by a zarr store (an INFO message says so):
    :func:`asign.io.persist` writes the table and the transformations, safely.

    Raises
    ------
    ValueError
        With ``inplace=True``, before any registration, if ``key_added`` is a coordinate system of some element that
        no earlier asign alignment recorded in the table wrote (``uns['asign']['alignment']['key_added']`` /
        ``['keys_added']``), e.g. a manual landmark alignment: choose another ``key_added`` or remove it; or if the
        table has ``obs['z']``, ``obsm['spatial_aligned']`` or ``obsm['spatial_3d']`` but records no asign
        alignment: these names are fixed, so remove or rename the user's keys first. A re-run over asign's own
        results replaces them.
    """
    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    _check_key_added(stack, key_added)
    if transform not in TRANSFORM_TYPES:
        msg = f"Unknown transform {transform!r}; choose one of {list(TRANSFORM_TYPES)}."
        raise ValueError(msg)
    if method not in METHODS:
        msg = f"Unknown method {method!r}; choose one of {list(METHODS)}."
        raise ValueError(msg)
    if pairs not in ("adjacent", "second"):
        msg = f"Unknown pairs={pairs!r}; choose 'adjacent' (consecutive sections) or 'second' (also (i, i + 2))."
        raise ValueError(msg)
    secs = _resolve_sections(stack, sections)
    if reference is None:
        reference = default_reference(secs)
    elif reference not in stack.sections:
        msg = f"Unknown reference section {reference!r}; the stack has sections {stack.sections}."
        raise KeyError(msg)
    elif reference not in secs:
        msg = f"The reference section {reference!r} is not among the sections to align {secs}."
        raise ValueError(msg)
    target_size = check_number("target_size", target_size, integer=True, minimum=16)
    min_dice = check_number("min_dice", min_dice, minimum=0.0)
    rotation_step = check_number("rotation_step", rotation_step, minimum=0.0, strict=True)
    if rotation_step > 360:
        msg = f"`rotation_step` must be at most 360 degrees, got {rotation_step:g}."
        raise ValueError(msg)
    max_scale_ratio = check_number("max_scale_ratio", max_scale_ratio, minimum=1.0)
    seed = check_number("seed", seed, integer=True)
    params: dict[str, Any] = {
        "sections": list(secs),
        "mirror": bool(mirror),
        "target_size": int(target_size),
        "min_dice": float(min_dice),
        "rotation_step": float(rotation_step),
        "pairs": str(pairs),
        "seed": int(seed),
    }
    if method == "transforms":
        if transforms is None:
            msg = "method='transforms' needs `transforms={section: 3 x 3 matrix}`."
            raise ValueError(msg)
        unknown = [s for s in transforms if str(s) not in stack.sections]
        if unknown:
            msg = f"Transforms given for unknown sections {unknown}; the stack has sections {stack.sections}."
            raise KeyError(msg)
        lacking = [s for s in secs if s not in transforms and s != reference]
        if lacking:
            msg = f"method='transforms': no matrix for sections {lacking}; give one per section or pass `sections=`."
            raise ValueError(msg)
        if reference not in transforms:
            msg = (
                f"method='transforms': no matrix for the reference {reference!r}; give every section's map into a "
                "common frame (the reference's included) so they can be re-expressed relative to it."
            )
            raise ValueError(msg)
    elif len(secs) < 2:
        msg = f"align_layers(method={method!r}) needs at least two sections to register, got {secs}" + (
            " (the stack has only one section)." if len(stack.sections) < 2 else "; widen `sections=`."
        )
        raise ValueError(msg)
    if inplace:  # the user's own coordinate system or table keys are never replaced: refused before any work
        _check_not_users(sdata, get_table(sdata, table_key), key_added, table_key)
    t0 = time.perf_counter()
    quality: dict[str, Any] = {}
    if method == "transforms":
        T = relative_to_reference({s: transforms[s] for s in secs}, reference)
        if len(secs) > 1:
            from asign._registration import evaluate_transforms

            quality = evaluate_transforms(sdata, stack, secs, T, reference=reference, target_size=target_size)
    else:
        from asign._registration import register_stack

        res = register_stack(
            sdata,
            stack,
            secs,
            reference=reference,
            transform=transform,
            method=method,
            mirror=mirror,
            landmarks=landmarks,
            target_size=target_size,
            rotation_step=rotation_step,
            max_scale_ratio=max_scale_ratio,
            pairs=pairs,
            seed=seed,
            show_progress_bar=show_progress_bar,
        )
        T = res.transforms
        quality = res.quality
        params.update(res.params)
        params["transform"] = str(transform)
    if quality.get("pair") is not None and len(quality["pair"]):
        _warn_quality(quality, min_dice)
        quality["passed"] = [bool(d >= min_dice) for d in quality["dice_after"]]
    params["seconds"] = float(time.perf_counter() - t0)
    if len(secs) < len(stack.sections):
        skipped = [s for s in stack.sections if s not in secs]
        logger.warning(f"Sections {skipped} are not aligned (not in `sections=`); their spots get NaN positions.")
    kind = classify_in_microns(T, stack, reference)
    if not inplace:
        return {
            "reference": reference,
            "method": method,
            "transform": kind,
            "key_added": key_added,
            "um_per_px": float(stack.um_per_px[stack.index(reference)]),
            "sections": list(secs),
            "transforms": T,
            "quality": quality,
            "params": params,
        }
    set_alignment(
        sdata,
        T,
        reference=reference,
        table_key=table_key,
        key_added=key_added,
        method=method,
        transform=kind,
        quality=quality,
        params=params,
    )
    return None


def _resolve_sections(stack: StackInfo, sections: Sequence[str] | None) -> list[str]:
    if sections is None:
        return list(stack.sections)
    if isinstance(sections, str):
        sections = [sections]
    unknown = [s for s in sections if s not in stack.sections]
    if unknown:
        msg = f"Unknown sections {unknown} in `sections=`; the stack has sections {stack.sections}."
        raise KeyError(msg)
    if len(set(sections)) != len(sections):
        msg = f"`sections=` lists a section twice: {list(sections)}."
        raise ValueError(msg)
    # always in cutting order
    return [s for s in stack.sections if s in set(sections)]


def _warn_quality(quality: Mapping[str, Any], min_dice: float) -> None:
    for pair, d in zip(quality["pair"], quality["dice_after"], strict=True):
        if np.isfinite(d) and d < min_dice:
            logger.warning(
                f"Alignment of pair {pair}: tissue-mask Dice {d:.3f} is below min_dice={min_dice}; the registration "
                "may have failed. Check it with `asign.pl.alignment`, or give `landmarks=` or `mirror=True`. (A "
                "partial section, its tissue cut at its image's border, scores a low Dice even when placed right.)"
            )
