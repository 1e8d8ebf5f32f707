"""The HER2ST reader: a tiny fake folder in the default suite, patient C of the real data set behind markers."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from asign._constants import Key
from asign._stack import get_stack
from asign.io import _her2st as her2st_io
from asign.io import read_her2st, validate_stack

# --- a tiny fake HER2ST folder

GRID_PX = 20.0  # pixels per ST grid step (200 µm) -> 10 µm / px
IMG_W, IMG_H = 600, 520


def _rigid(theta_deg: float, tx: float, ty: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t), tx], [np.sin(t), np.cos(t), ty], [0.0, 0.0, 1.0]])


TRUE_TRANSFORMS = {"B1": np.eye(3), "B2": _rigid(12.0, -30.0, 8.5)}


def _fake_her2st(root: Path, *, layout: str = "csv", images: tuple[str, ...] = ("B2",)) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    (root / "data" / "ST-cnts").mkdir(parents=True)
    (root / "data" / "ST-spotfiles").mkdir(parents=True)
    genes = {"B1": ["ERBB2", "GATA3", "KRT8"], "B2": ["ERBB2", "KRT8", "MUC1", "ACTB"]}
    counts = {}
    rows = []
    for s, M in TRUE_TRANSFORMS.items():
        xs, ys = np.meshgrid(np.arange(3, 12), np.arange(4, 10))
        xs, ys = xs.ravel(), ys.ravel()
        ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
        px = np.column_stack([xs * GRID_PX + 7.0, ys * GRID_PX + 11.0]) + rng.normal(0, 0.5, (len(xs), 2))
        spots = pd.DataFrame(
            {
                "x": xs,
                "y": ys,
                "new_x": xs + 0.01,
                "new_y": ys - 0.01,
                "pixel_x": px[:, 0],
                "pixel_y": px[:, 1],
                "selected": 1,
            }
        )
        spots.to_csv(root / "data" / "ST-spotfiles" / f"{s}_selection.tsv", sep="\t", index=False)
        # the count table holds all but the first spot, in shuffled order
        order = rng.permutation(np.arange(1, len(ids)))
        c = pd.DataFrame(rng.poisson(4, (len(order), len(genes[s]))), index=[ids[i] for i in order], columns=genes[s])
        c.to_csv(root / "data" / "ST-cnts" / f"{s}.tsv.gz", sep="\t", compression="gzip")
        counts[s] = c
        warped = px @ M[:2, :2].T + M[:2, 2]
        for i in order:
            rows.append((s, ids[i], px[i, 0], px[i, 1], warped[i, 0], warped[i, 1]))
    # a section of another patient, which must be ignored
    counts["A1"] = counts["B1"]
    counts["B1"].to_csv(root / "data" / "ST-cnts" / "A1.tsv.gz", sep="\t", compression="gzip")
    if layout == "csv":
        recs = []
        for s, M in TRUE_TRANSFORMS.items():
            recs.append({"section": s, "reference": "B1", "a11": M[0, 0], "a12": M[0, 1], "a21": M[1, 0],
                         "a22": M[1, 1], "tx": M[0, 2], "ty": M[1, 2]})  # fmt: skip
        pd.DataFrame(recs).to_csv(root / "section_transforms.csv", index=False)
    elif layout == "cluster":
        lbl = root / "res" / "ST-cluster" / "lbl"
        lbl.mkdir(parents=True)
        df = pd.DataFrame(rows, columns=["ids", "spot", "pixel_x", "pixel_y", "warped_x", "warped_y"])
        for s, part in df.groupby("ids"):
            part = part.assign(label=1, patient_id="B").set_index("spot")
            part.to_csv(lbl / f"{s}-cluster-annotation.tsv.gz", sep="\t", compression="gzip")
    for s in images:
        folder = root / "data" / "ST-imgs" / "B" / s
        folder.mkdir(parents=True)
        yy, xx = np.mgrid[0:IMG_H, 0:IMG_W]
        arr = np.stack([(xx * 255 // IMG_W), (yy * 255 // IMG_H), np.full_like(xx, 128)], axis=-1).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"HE_{s}.jpg", quality=95)
    return counts


@pytest.fixture
def fake_her2st(tmp_path):
    root = tmp_path / "her2st"
    counts = _fake_her2st(root)
    return root, counts


def test_fake_her2st_reads_sections_spots_counts(fake_her2st):
    root, counts = fake_her2st
    sdata = read_her2st(root, patient="B")
    stack = validate_stack(sdata)
    t = sdata.tables["table"]
    assert stack.sections == ["B1", "B2"]
    assert stack.image_keys == [None, "he_B2"]
    assert list(sdata.images) == ["he_B2"]
    np.testing.assert_array_equal(t.obs["has_image"], t.obs["section"] == "B2")
    assert t.obs["has_image"].dtype == bool
    assert sorted(t.var_names) == ["ACTB", "ERBB2", "GATA3", "KRT8", "MUC1"]
    for s in ("B1", "B2"):
        m = (t.obs["section"] == s).to_numpy()
        assert m.sum() == len(counts[s])
        assert list(t.obs_names[m]) == [f"{s}_{i}" for i in counts[s].index]
        got = pd.DataFrame(t.X[m].toarray(), index=counts[s].index, columns=t.var_names)
        pd.testing.assert_frame_equal(got[counts[s].columns], counts[s].astype(np.float32), check_dtype=False)
        absent = [g for g in t.var_names if g not in counts[s].columns]
        assert got[absent].to_numpy().sum() == 0
        # array coordinates parsed from the spot ids
        rc = np.array([list(map(int, i.split("x"))) for i in counts[s].index])
        np.testing.assert_array_equal(t.obs.loc[m, "array_col"], rc[:, 0])
        np.testing.assert_array_equal(t.obs.loc[m, "array_row"], rc[:, 1])
    # pixel size from the spot grid (20 px per 200 µm), spot diameter 100 µm
    np.testing.assert_allclose(stack.um_per_px, 10.0, rtol=0.01)
    assert stack.spot_diameter_um == 100.0
    np.testing.assert_allclose(stack.z_um, [0.0, 16.0])
    assert t.uns["asign"]["dataset"] == {"name": "her2st", "patient": "B", "reference_section": "B1"}


def _check_reference(sdata):
    t = sdata.tables["table"]
    for s, M in TRUE_TRANSFORMS.items():
        m = (t.obs["section"] == s).to_numpy()
        xy = t.obsm[Key.SPATIAL][m]
        np.testing.assert_allclose(t.obsm[Key.HER2ST_REFERENCE][m], xy @ M[:2, :2].T + M[:2, 2], atol=1e-6)
        np.testing.assert_allclose(t.uns["asign"]["her2st_transforms"][s], M, atol=1e-9)


def test_fake_her2st_published_registration_from_csv(fake_her2st):
    root, _ = fake_her2st
    _check_reference(read_her2st(root, patient="B"))


def test_fake_her2st_upstream_layout_cluster_files(tmp_path):
    root = tmp_path / "upstream"
    _fake_her2st(root, layout="cluster", images=())
    sdata = read_her2st(root, patient="B")
    _check_reference(sdata)  # rigid fit on warped_x / warped_y
    assert get_stack(sdata).image_keys == [None, None]
    assert sdata.tables["table"].uns["asign"]["dataset"]["reference_section"] == "B1"


def test_fake_her2st_without_registration(tmp_path):
    root = tmp_path / "bare"
    _fake_her2st(root, layout="none", images=())
    t = read_her2st(root, patient="B").tables["table"]
    assert np.isnan(t.obsm[Key.HER2ST_REFERENCE]).all()
    assert t.uns["asign"]["her2st_transforms"] == {}


def test_fake_her2st_image_is_a_lazy_pyramid(fake_her2st):
    root, _ = fake_her2st
    her2st_io._cache.clear()
    sdata = read_her2st(root, patient="B")
    img = sdata.images["he_B2"]
    assert list(img.children) == ["scale0", "scale1"]  # 520 -> 260 -> (130 < 256: dropped)
    l0 = img["scale0"]["image"]
    assert isinstance(l0.data, da.Array) and l0.dtype == np.uint8
    assert l0.shape == (3, IMG_H, IMG_W)
    assert her2st_io._cache == {}  # nothing decoded while reading
    # the low-resolution level is decoded on its own (JPEG DCT scaling), never through the full image
    l1 = img["scale1"]["image"].values
    assert l1.shape == (3, IMG_H // 2, IMG_W // 2)
    assert [k[1:] for k in her2st_io._cache] == [(IMG_H // 2, IMG_W // 2)]
    full = l0.values
    assert [k[1:] for k in her2st_io._cache] == [(IMG_H // 2, IMG_W // 2), (IMG_H, IMG_W)]
    coarse = full.reshape(3, IMG_H // 2, 2, IMG_W // 2, 2).mean(axis=(2, 4))
    assert np.abs(coarse - l1).mean() < 3.0
    # the gradient image: red follows x, green follows y
    assert full[0, :, -5].mean() > 240 and full[0, :, 5].mean() < 15
    assert full[1, -5, :].mean() > 240 and full[1, 5, :].mean() < 15


def test_fake_her2st_options(fake_her2st, caplog):
    root, _ = fake_her2st
    with caplog.at_level(logging.WARNING, logger="asign"):
        sdata = read_her2st(root, patient="b", sections="B2", images=False, genes=["KRT8", "ERBB2", "GATA3"])
    assert "genes ['GATA3'] are measured in none of the sections ['B2']" in caplog.text
    t = sdata.tables["table"]
    assert get_stack(sdata).sections == ["B2"]  # one name is one section
    assert list(sdata.images) == []
    assert list(t.var_names) == ["KRT8", "ERBB2"]  # the requested order; GATA3 is not measured in B2
    np.testing.assert_array_equal(t.var["n_sections_measured"], [1, 1])


def test_fake_her2st_genes_keep_the_unrestricted_var(fake_her2st, caplog):
    root, counts = fake_her2st
    full = read_her2st(root, patient="B", images=False).tables["table"]
    with caplog.at_level(logging.WARNING, logger="asign"):
        t = read_her2st(root, patient="B", images=False, genes=["GATA3", "NOTAGENE", "ERBB2", "MUC1"]).tables["table"]
    assert "genes ['NOTAGENE'] are measured in none of the sections ['B1', 'B2']" in caplog.text
    assert list(t.var_names) == ["GATA3", "ERBB2", "MUC1"]
    pd.testing.assert_frame_equal(t.var, full.var.loc[["GATA3", "ERBB2", "MUC1"]])
    np.testing.assert_array_equal(t.var["n_sections_measured"], [1, 2, 1])
    np.testing.assert_array_equal(t.X.toarray(), full[:, ["GATA3", "ERBB2", "MUC1"]].X.toarray())
    validate_stack(read_her2st(root, patient="B", images=False, genes="ERBB2"))
    with pytest.raises(ValueError, match=r"None of the genes \['NOTAGENE', 'NOPE'\] is measured in sections"):
        read_her2st(root, patient="B", images=False, genes=["NOTAGENE", "NOPE"])


def test_fake_her2st_z_follows_the_layer(fake_her2st):
    root, _ = fake_her2st
    np.testing.assert_allclose(get_stack(read_her2st(root, patient="B", sections=["B2"], images=False)).z_um, [16.0])
    np.testing.assert_allclose(get_stack(read_her2st(root, patient="B", images=False)).z_um, [0.0, 16.0])
    with pytest.raises(ValueError, match=r"Sections \['B2', 'B1'\] of patient B are not in cutting order"):
        read_her2st(root, patient="B", sections=["B2", "B1"], images=False)


def test_fake_her2st_errors(fake_her2st, tmp_path):
    root, _ = fake_her2st
    with pytest.raises(ValueError, match="Unknown HER2ST patient 'Z'"):
        read_her2st(root, patient="Z")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_her2st(tmp_path / "nowhere", patient="B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data/ST-cnts"):
        read_her2st(tmp_path / "empty", patient="B")
    with pytest.raises(ValueError, match=r"Sections \['B7'\] of patient B not found.*available: \['B1', 'B2'\]"):
        read_her2st(root, patient="B", sections=["B1", "B7"])
    with pytest.raises(FileNotFoundError, match="No count files of patient C"):
        read_her2st(root, patient="C")
    (root / "data" / "ST-spotfiles" / "B2_selection.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="Section B2: spot file .* not found"):
        read_her2st(root, patient="B")


def test_fit_rigid_recovers_a_rotation():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 1000, (50, 2))
    M = _rigid(-73.0, 120.0, -4.0)
    np.testing.assert_allclose(her2st_io._fit_rigid(src, src @ M[:2, :2].T + M[:2, 2]), M, atol=1e-8)


# --- asign.datasets.her2st


def test_datasets_her2st_local_folder(fake_her2st, monkeypatch):
    from asign.datasets import her2st

    root, _ = fake_her2st
    assert get_stack(her2st("B", path=root)).sections == ["B1", "B2"]
    monkeypatch.setenv("ASIGN_HER2ST", str(root))
    assert get_stack(her2st("B", sections=["B1"])).sections == ["B1"]


def test_datasets_her2st_missing_folder(tmp_path, monkeypatch):
    from asign.datasets import her2st

    monkeypatch.delenv("ASIGN_HER2ST", raising=False)
    with pytest.raises(FileNotFoundError, match="No HER2ST folder found"):
        her2st("C", download=False)
    with pytest.raises(FileNotFoundError, match="is not a HER2ST folder"):
        her2st("C", path=tmp_path)


def test_download_uses_registry_checksums(tmp_path, monkeypatch):
    import pooch

    from asign.datasets import download_her2st
    from asign.datasets._her2st import BASE_URL, registry

    calls = []
    monkeypatch.setattr(pooch, "retrieve", lambda url, known_hash, path, fname, **kw: calls.append((url, known_hash)))
    root = download_her2st("C", sections=["C1", "C2"], images=True, cache=tmp_path)
    assert root == tmp_path
    urls = dict(calls)
    reg = registry()
    expected = {
        "data/ST-cnts/C1.tsv.gz",
        "data/ST-spotfiles/C1_selection.tsv",
        "res/ST-cluster/lbl/C1-cluster-annotation.tsv.gz",
        "data/ST-pat/lbl/C1_labeled_coordinates.tsv",
        "data/ST-imgs/C/C1/5714_HE_BT_C1.jpg",
        "data/ST-cnts/C2.tsv.gz",
        "data/ST-spotfiles/C2_selection.tsv",
        "res/ST-cluster/lbl/C2-cluster-annotation.tsv.gz",
        "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    }
    assert set(urls) == {BASE_URL + r for r in expected}
    for rel in expected:
        sha = reg[rel]
        assert urls[BASE_URL + rel] == (None if sha is None else f"sha256:{sha}")
    assert urls[BASE_URL + "data/ST-cnts/C1.tsv.gz"].startswith("sha256:")
    assert len([r for r in reg if r.startswith("data/ST-cnts/")]) == 36


# --- the real data set (patient C)

PATIENT_C = {"C1": 176, "C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


@pytest.fixture(scope="module")
def patient_c(her2st_path):
    her2st_io._cache.clear()
    t0 = time.perf_counter()
    sdata = read_her2st(her2st_path, patient="C")
    elapsed = time.perf_counter() - t0
    return sdata, elapsed


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_c_sections_spots_images(patient_c):
    sdata, _ = patient_c
    stack = validate_stack(sdata)
    t = sdata.tables["table"]
    assert stack.sections == list(PATIENT_C)
    assert t.n_obs == 1086
    assert t.obs["section"].value_counts(sort=False).to_dict() == PATIENT_C
    assert stack.image_keys == [None, "he_C2", "he_C3", "he_C4", "he_C5", "he_C6"]
    assert sorted(sdata.images) == ["he_C2", "he_C3", "he_C4", "he_C5", "he_C6"]
    np.testing.assert_allclose(stack.um_per_px, 0.69, atol=0.005)
    validate_stack(sdata, require_images=["C2", "C3", "C4", "C5", "C6"])


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("section", ["C1", "C4"])
def test_patient_c_counts_identical_to_files(patient_c, her2st_path, section):
    sdata, _ = patient_c
    t = sdata.tables["table"]
    ref = pd.read_csv(her2st_path / "data" / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    m = (t.obs["section"] == section).to_numpy()
    assert list(t.obs_names[m]) == [f"{section}_{i}" for i in ref.index]
    got = pd.DataFrame(t.X[m].toarray(), index=ref.index, columns=t.var_names)
    np.testing.assert_array_equal(got[ref.columns].to_numpy(), ref.to_numpy())
    others = t.var_names.difference(ref.columns)
    assert got[others].to_numpy().sum() == 0
    # spot centres from the spot file
    spots = pd.read_csv(her2st_path / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    np.testing.assert_allclose(t.obsm["spatial"][m], spots.loc[ref.index, ["pixel_x", "pixel_y"]].to_numpy())


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_c_is_lazy(patient_c):
    sdata, elapsed = patient_c
    print(f"read_her2st(patient='C'): {elapsed:.2f} s")
    assert elapsed < 10.0
    assert her2st_io._cache == {}  # no image decoded
    for key in sdata.images:
        img = sdata.images[key]
        assert len(img.children) == 5
        l0 = img["scale0"]["image"]
        assert isinstance(l0.data, da.Array)
        assert l0.shape[1] > 9000 and l0.shape[2] > 9000
    # a thumbnail is decoded without the full image
    t0 = time.perf_counter()
    thumb = sdata.images["he_C3"]["scale4"]["image"].values
    assert time.perf_counter() - t0 < 5.0
    assert thumb.shape[1] < 700
    assert all(k[1] < 1000 for k in her2st_io._cache)


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_c_published_registration(patient_c, her2st_path):
    sdata, _ = patient_c
    t = sdata.tables["table"]
    tf = pd.read_csv(her2st_path / "section_transforms.csv", index_col="section")
    for s in PATIENT_C:
        r = tf.loc[s]
        M = np.array([[r.a11, r.a12, r.tx], [r.a21, r.a22, r.ty], [0, 0, 1.0]])
        m = (t.obs["section"] == s).to_numpy()
        xy = t.obsm["spatial"][m]
        np.testing.assert_allclose(t.obsm[Key.HER2ST_REFERENCE][m], xy @ M[:2, :2].T + M[:2, 2])
        np.testing.assert_allclose(t.uns["asign"]["her2st_transforms"][s], M)
    assert t.uns["asign"]["dataset"]["reference_section"] == "C1"
    np.testing.assert_allclose(t.uns["asign"]["her2st_transforms"]["C1"], np.eye(3), atol=1e-9)


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_c_cluster_fit_matches_published_transforms(her2st_path, tmp_path):
    # the upstream layout (no section_transforms.csv): the rigid fit on the cluster files gives the same maps
    fitted, refs = her2st_io._read_transforms_from_clusters(her2st_path, list(PATIENT_C))
    tf = pd.read_csv(her2st_path / "section_transforms.csv", index_col="section")
    for s in PATIENT_C:
        r = tf.loc[s]
        M = np.array([[r.a11, r.a12, r.tx], [r.a21, r.a22, r.ty], [0, 0, 1.0]])
        np.testing.assert_allclose(fitted[s], M, atol=0.05)
        assert refs[s] == "C1"


@pytest.mark.slow
@pytest.mark.real_data
def test_registry_matches_local_files(her2st_path):
    from asign.datasets._her2st import registry

    checked = 0
    for rel, sha in registry().items():
        f = her2st_path / rel
        if sha is None or not f.exists() or not rel.split("/")[-1].startswith(("C", "5714")):
            continue
        assert hashlib.sha256(f.read_bytes()).hexdigest() == sha, rel
        checked += 1
    assert checked >= 20


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_e_skipped_section_keeps_its_gap(her2st_path):
    z = read_her2st(her2st_path, patient="E", sections=["E1", "E3"], images=False, genes=["ERBB2"])
    np.testing.assert_allclose(get_stack(z).z_um, [0.0, 32.0])  # E1 and E3 are two cuts apart
    every = read_her2st(her2st_path, patient="E", images=False, genes=["ERBB2"])
    np.testing.assert_allclose(get_stack(every).z_um, [0.0, 16.0, 32.0])


@pytest.mark.slow
@pytest.mark.real_data
def test_patient_e_genes_restrict_the_unrestricted_var(her2st_path, caplog):
    full = read_her2st(her2st_path, patient="E", sections=["E1", "E2"], images=False).tables["table"]
    e1 = pd.read_csv(her2st_path / "data" / "ST-cnts" / "E1.tsv.gz", sep="\t", index_col=0, nrows=0).columns
    genes = [next(g for g in full.var_names if g not in e1), "ERBB2"]  # a gene of E2 only, one of both
    with caplog.at_level(logging.WARNING, logger="asign"):
        t = read_her2st(her2st_path, patient="E", sections=["E1", "E2"], images=False, genes=[*genes, "NOTAGENE"])
    assert "genes ['NOTAGENE']" in caplog.text
    pd.testing.assert_frame_equal(t.tables["table"].var, full.var.loc[genes])
    with pytest.raises(ValueError, match=r"None of the genes \['NOTAGENE'\]"):
        read_her2st(her2st_path, patient="E", sections="E1", images=False, genes="NOTAGENE")


def test_download_refuses_unknown_sections_before_any_download(tmp_path, monkeypatch):
    """A section name the patient lacks is an error (it downloaded nothing and pointed at the folder before)."""
    import pooch

    from asign.datasets._her2st import BASE_URL, download_her2st

    calls = []
    monkeypatch.setattr(pooch, "retrieve", lambda url, **kw: calls.append(url.removeprefix(BASE_URL)))
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['C7'\] of HER2ST patient C"):
        download_her2st("C", sections=["C7"], cache=tmp_path)
    assert not any(tmp_path.iterdir()) and calls == []
    # one name as a string is one section (not its characters); lower case is accepted
    download_her2st("c", sections="c2", images=False, cache=tmp_path)
    assert sorted(calls) == [
        "data/ST-cnts/C2.tsv.gz",
        "data/ST-spotfiles/C2_selection.tsv",
        "res/ST-cluster/lbl/C2-cluster-annotation.tsv.gz",
    ]
    with pytest.raises(ValueError, match=r"\['C9'\]"):
        download_her2st("c", sections="c9", cache=tmp_path)


# --- malformed folders: errors name the file and the section


def _rewrite_counts(path: Path, edit) -> None:
    import gzip

    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(edit(lines)) + "\n")


def _set_value(lines: list[str], row: int, col: int, value: str) -> list[str]:
    fields = lines[row].split("\t")
    fields[col] = value
    lines[row] = "\t".join(fields)
    return lines


def test_fake_her2st_repeated_spot_rows(fake_her2st, asign_log):
    """A spot twice in the spot file: identical rows are dropped with a warning, different ones are an error (the
    first row was used silently before)."""
    root, _ = fake_her2st
    f = root / "data" / "ST-spotfiles" / "B2_selection.tsv"
    expected = read_her2st(root, patient="B", images=False).tables["table"]
    spots = pd.read_csv(f, sep="\t")
    pd.concat([spots, spots.iloc[[5, 7]]]).to_csv(f, sep="\t", index=False)
    t = read_her2st(root, patient="B", images=False).tables["table"]
    assert "2 rows of the spot file" in asign_log.warnings and "repeated identically" in asign_log.warnings
    np.testing.assert_allclose(t.obsm[Key.SPATIAL], expected.obsm[Key.SPATIAL], rtol=1e-12)  # csv round trip
    moved = spots.iloc[[5]].assign(pixel_x=1.0)
    pd.concat([spots, moved]).to_csv(f, sep="\t", index=False)
    spot = f"{spots['x'][5]}x{spots['y'][5]}"
    with pytest.raises(
        ValueError, match=rf"Section B2: the spot file .*B2_selection.tsv has different rows .*'{spot}'"
    ):
        read_her2st(root, patient="B", images=False)


def test_fake_her2st_two_jpegs_in_a_section_folder(fake_her2st):
    root, _ = fake_her2st
    folder = root / "data" / "ST-imgs" / "B" / "B2"
    (folder / "A_other.jpg").write_bytes((folder / "HE_B2.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"section B2: 2 JPEG files in .*B2 \(\['A_other.jpg', 'HE_B2.jpg'\]\)"):
        read_her2st(root, patient="B")
    read_her2st(root, patient="B", images=False)  # the images are not looked at


def test_fake_her2st_missing_count_file(fake_her2st, asign_log):
    """A section with a spot file and an image but no count file: skipped with a warning (silently before), an error
    when named."""
    root, _ = fake_her2st
    (root / "data" / "ST-cnts" / "B2.tsv.gz").unlink()
    assert get_stack(read_her2st(root, patient="B")).sections == ["B1"]
    assert "sections ['B2'] are skipped: their count files" in asign_log.warnings
    assert "B2.tsv.gz" in asign_log.warnings
    with pytest.raises(FileNotFoundError, match=r"Sections \['B2'\] of patient B have no count file: .*B2.tsv.gz"):
        read_her2st(root, patient="B", sections=["B1", "B2"])
    asign_log.records.clear()
    read_her2st(root, patient="B", sections="B1")
    assert not asign_log.warnings  # only when all sections are read


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _not_gzipped(path: Path) -> None:
    import gzip

    with gzip.open(path, "rb") as fh:
        data = fh.read()
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda r: _rewrite_counts(r / "data/ST-cnts/B2.tsv.gz", lambda L: _set_value(L, 1, 2, "NA")),
            r"Section B2: count table .*B2.tsv.gz has a value that is not a number \(spot '\d+x\d+', gene 'KRT8'\)",
        ),
        (
            lambda r: _rewrite_counts(
                r / "data/ST-cnts/B2.tsv.gz", lambda L: [*L[:3], L[3].rsplit("\t", 1)[0], *L[4:]]
            ),
            r"Section B2: count table .*B2.tsv.gz: the row of spot '\d+x\d+' has 3 values for the 4 genes",
        ),
        (
            lambda r: _rewrite_counts(r / "data/ST-cnts/B2.tsv.gz", lambda L: L[:1]),
            r"Section B2: count table .*B2.tsv.gz has no spots",
        ),
        (
            lambda r: _not_gzipped(r / "data/ST-cnts/B2.tsv.gz"),
            r"Section B2: count table .*B2.tsv.gz cannot be read: it is not a complete gzip-compressed table",
        ),
        (
            lambda r: _truncate(r / "data/ST-cnts/B2.tsv.gz"),
            r"Section B2: count table .*B2.tsv.gz cannot be read: it is not a complete gzip-compressed table",
        ),
        (
            lambda r: (f := r / "data/ST-spotfiles/B2_selection.tsv").write_text(
                pd.read_csv(f, sep="\t").drop(columns="pixel_x").to_csv(sep="\t", index=False)
            ),
            r"Section B2: the spot file .*B2_selection.tsv has no column \['pixel_x'\]",
        ),
        (
            lambda r: (f := r / "data/ST-spotfiles/B2_selection.tsv").write_text(
                pd.read_csv(f, sep="\t").assign(pixel_y=np.nan).to_csv(sep="\t", index=False)
            ),
            r"Section B2: \d+ spots of the count table have no finite pixel_x / pixel_y in .*B2_selection.tsv",
        ),
        (
            lambda r: (f := r / "data/ST-spotfiles/B2_selection.tsv").write_text(
                pd.read_csv(f, sep="\t").assign(pixel_y="abc").to_csv(sep="\t", index=False)
            ),
            r"Section B2: the columns \['pixel_y'\] of the spot file .*B2_selection.tsv hold values that are not",
        ),
        (
            lambda r: _truncate(r / "data/ST-imgs/B/B2/HE_B2.jpg"),
            r"Section B2: cannot read its H&E image \(.*HE_B2.jpg is truncated or not a complete JPEG",
        ),
        (
            lambda r: (r / "data/ST-imgs/B/B2/HE_B2.jpg").write_bytes(b"not a jpeg"),
            r"Section B2: cannot read its H&E image \(cannot identify image file .*HE_B2.jpg",
        ),
    ],
    ids=[
        "NA",
        "ragged",
        "header-only",
        "not-gzipped",
        "truncated-gz",
        "no-pixel_x",
        "nan-pixel",
        "text-pixel",
        "truncated-jpeg",
        "not-a-jpeg",
    ],
)
def test_fake_her2st_malformed_files_are_named(fake_her2st, corrupt, message):
    root, _ = fake_her2st
    corrupt(root)
    with pytest.raises(ValueError, match=message):
        read_her2st(root, patient="B")


def test_truncated_jpeg_decode_error_names_the_file(tmp_path):
    """Decoding (at compute) names the file; PIL's 'image file is truncated' named none."""
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path, quality=95)
    _truncate(path, 0.6)
    her2st_io._cache.clear()
    with pytest.raises(OSError, match=r"Could not decode the JPEG .*cut.jpg: image file is truncated"):
        her2st_io._decode_jpeg(str(path), 300, 400)
    with pytest.raises(ValueError, match=r"cut.jpg is truncated"):
        her2st_io.lazy_jpeg(path)


def test_fake_her2st_argument_errors(fake_her2st, tmp_path):
    root, _ = fake_her2st
    # section names are case-insensitive, like the patient (and download_her2st)
    assert get_stack(read_her2st(root, patient="b", sections=["b1", "B2"], images=False)).sections == ["B1", "B2"]
    assert get_stack(read_her2st(root, patient="B", sections="b2", images=False)).sections == ["B2"]
    with pytest.raises(TypeError, match=r"`patient` must be one of .* got None"):
        read_her2st(root, patient=None)
    with pytest.raises(ValueError, match="`sections` is empty"):
        read_her2st(root, patient="B", sections=[])
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        read_her2st(afile, patient="B")
