from __future__ import annotations

import pytest

from asign._cli import main


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "demo" in capsys.readouterr().err


def test_demo_runs_the_pipeline(tmp_path, capsys):
    # the README's main command (`asign demo`), on 3 sections: in the default suite so that CI guards it (~100 s)
    import spatialdata as sd

    out = tmp_path / "demo.zarr"
    assert main(["demo", "--out", str(out), "--n-sections", "3"]) == 0
    text = capsys.readouterr().out
    for method in ("mean", "nearest", "propagation", "propagation + gene_rank 10", "ridge", "asign"):
        assert method in text
    back = sd.read_zarr(out)
    assert {"table", "asign", "asign_propagation", "asign_propagation_gene_rank_10"} <= set(back.tables)
    assert "full_rank" in back.tables["asign_propagation_gene_rank_10"].layers
    assert back.tables["asign"].layers["imputed"].shape[0] == back.tables["table"].n_obs
    assert back.tables["table"].uns["asign"]["demo"]["data"] == "synthetic"
    # the store of an earlier demo is replaced without --overwrite (running the README command twice works)
    from asign._cli import _is_demo_store

    assert _is_demo_store(out)


@pytest.mark.slow
@pytest.mark.real_data
def test_demo_on_her2st_leaves_out_sections_without_an_image(her2st_path, tmp_path, capsys):
    """`asign demo --her2st`: patient C's C1 has no image, so the demo runs on C2-C6 (it failed on C1 before)."""
    import spatialdata as sd

    out = tmp_path / "her2st.zarr"
    assert main(["demo", "--her2st", str(her2st_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "left out (no H&E image, so they cannot be aligned): ['C1']" in text
    assert "known ['C2']" in text
    back = sd.read_zarr(out)
    assert set(back.tables["table"].obs["section"].astype(str)) == {"C2", "C3", "C4", "C5", "C6"}
    ev = back.tables["asign"]
    assert ev.n_obs == back.tables["table"].n_obs


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/index.md"])
def test_documented_python_example_runs(doc, tmp_path, monkeypatch, asign_log):
    """The first Python example of the README and of the docs' start page, executed as written (synthetic stack)."""
    import re
    from pathlib import Path

    import matplotlib

    matplotlib.use("agg")
    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{doc} has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], doc, "exec"), namespace)  # the document's own example
    assert not asign_log.warnings, f"{doc}'s example logs warnings: {asign_log.warnings}"  # it runs cleanly
    sdata = namespace["sdata"]
    assert {"asign", "asign_propagation"} <= set(sdata.tables)
    assert "imputed" in sdata.tables["asign"].layers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-sections", "1"], "--n-sections must be at least 2"),
        (["--encoder", "vit"], "unknown --encoder 'vit'; available: "),
        (["--her2st", "/nonexistent/her2st"], "is not a HER2ST folder"),
        (["--patient", "Z"], "invalid choice: 'Z'"),
    ],
)
def test_demo_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(tmp_path / "d.zarr"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()


def test_demo_never_replaces_a_foreign_path(tmp_path, capsys):
    """`--out` pointing at the user's folder or file is refused, not deleted (persist would replace it)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(folder)])
    assert "not the store of an earlier `asign demo`" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(afile), "--overwrite"])
    assert "is a file" in capsys.readouterr().err
    assert afile.read_text() == "keep"


class _Stop(Exception):
    pass


def _fake_her2st_files(root, images):
    """File names only (empty files): what `asign demo --her2st` looks at before it reads the patient."""
    (root / "data" / "ST-cnts").mkdir(parents=True)
    for s in ("C1", "C2", "C3", "D1"):
        (root / "data" / "ST-cnts" / f"{s}.tsv.gz").touch()
    for s in images:
        (root / "data" / "ST-imgs" / "C" / s).mkdir(parents=True)
        (root / "data" / "ST-imgs" / "C" / s / f"HE_{s}.jpg").touch()


@pytest.mark.parametrize(
    ("images", "read_sections"), [(("C2", "C3"), ["C2", "C3"]), (("C1", "C2", "C3"), None)], ids=["C1-no-image", "all"]
)
def test_demo_on_her2st_reads_the_patient_once(images, read_sections, tmp_path, monkeypatch):
    """The sections with an image come from the file names: the patient is read once, without the imageless ones."""
    import asign.datasets

    calls = []

    def fake_her2st(**kwargs):
        calls.append(kwargs)
        raise _Stop

    monkeypatch.setattr(asign.datasets, "her2st", fake_her2st)
    root = tmp_path / "her2st"
    _fake_her2st_files(root, images)
    with pytest.raises(_Stop):
        main(["demo", "--her2st", str(root), "--out", str(tmp_path / "d.zarr")])
    assert calls == [{"patient": "C", "path": str(root), "sections": read_sections}]


def test_demo_on_her2st_without_images_reads_nothing(tmp_path, monkeypatch, capsys):
    import asign.datasets

    calls = []
    monkeypatch.setattr(asign.datasets, "her2st", lambda **kw: calls.append(kw))
    root = tmp_path / "her2st"
    _fake_her2st_files(root, ())
    assert main(["demo", "--her2st", str(root), "--out", str(tmp_path / "d.zarr")]) == 1
    out = capsys.readouterr()
    msg = "asign: error: HER2ST patient C has no section with an H&E image; the demo needs images."
    assert msg in out.err and msg not in out.out  # an error goes to stderr
    assert calls == [] and not (tmp_path / "d.zarr").exists()


def test_demo_on_her2st_needs_two_sections_with_images(tmp_path, monkeypatch, capsys):
    """One section with an image cannot be aligned to anything (align_layers failed with a traceback before)."""
    import asign.datasets

    calls = []
    monkeypatch.setattr(asign.datasets, "her2st", lambda **kw: calls.append(kw))
    root = tmp_path / "her2st"
    _fake_her2st_files(root, ("C2",))
    assert main(["demo", "--her2st", str(root), "--out", str(tmp_path / "d.zarr")]) == 1
    err = capsys.readouterr().err
    assert "asign: error: HER2ST patient C has an H&E image for ['C2'] only" in err
    assert "at least two sections with images" in err
    assert calls == [] and not (tmp_path / "d.zarr").exists()


def _small_her2st(root, *, spot_files=True, na=False):
    """A readable HER2ST folder of patient C: C2 and C3 with counts, tiny images and (optionally) spot files."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    for sub in ("ST-cnts", "ST-spotfiles"):
        (root / "data" / sub).mkdir(parents=True, exist_ok=True)
    for s in ("C2", "C3"):
        ids = [f"{x}x{y}" for x in range(3, 7) for y in range(3, 6)]
        counts = pd.DataFrame(np.arange(3 * len(ids)).reshape(len(ids), 3), index=ids, columns=["A", "B", "C"])
        if na:
            counts = counts.astype(object)
            counts.iloc[1, 2] = "NA"
        counts.to_csv(root / "data" / "ST-cnts" / f"{s}.tsv.gz", sep="\t", compression="gzip")
        if spot_files:
            xy = np.array([list(map(int, i.split("x"))) for i in ids])
            spots = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "pixel_x": xy[:, 0] * 20.0, "pixel_y": xy[:, 1] * 20.0})
            spots.to_csv(root / "data" / "ST-spotfiles" / f"{s}_selection.tsv", sep="\t", index=False)
        (root / "data" / "ST-imgs" / "C" / s).mkdir(parents=True)
        Image.new("RGB", (300, 300), (200, 150, 190)).save(root / "data" / "ST-imgs" / "C" / s / f"HE_{s}.jpg")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spot_files": False}, r"Section C2: spot file .*C2_selection.tsv not found"),
        (
            {"na": True},
            r"Section C2: count table .*C2.tsv.gz has a value that is not a number \(spot '3x4', gene 'C'\)",
        ),
    ],
    ids=["no-spot-files", "NA-count"],
)
def test_demo_reports_user_errors_in_one_line(kwargs, message, tmp_path, capsys, monkeypatch):
    """Errors of the input print `asign: error: ...` on stderr and exit 1 (a traceback before); --debug and
    ASIGN_DEBUG=1 keep the traceback."""
    import re

    root = tmp_path / "her2st"
    _small_her2st(root, **kwargs)
    argv = ["demo", "--her2st", str(root), "--out", str(tmp_path / "d.zarr")]
    monkeypatch.delenv("ASIGN_DEBUG", raising=False)
    assert main(argv) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert lines[-1].startswith("asign: error: ") and re.search(message, lines[-1])
    assert "Traceback" not in out.err and "asign: error" not in out.out
    assert not (tmp_path / "d.zarr").exists()
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        main([*argv, "--debug"])
    monkeypatch.setenv("ASIGN_DEBUG", "1")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        main(argv)


def test_demo_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    import asign.datasets

    def bug(**kwargs):
        msg = "a bug"
        raise RuntimeError(msg)

    monkeypatch.setattr(asign.datasets, "synthetic_stack", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["demo", "--out", str(tmp_path / "d.zarr")])


def test_demo_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
    """`--out` below a regular file is refused up front (the whole pipeline ran and persist failed before)."""
    import asign._cli as cli

    monkeypatch.setattr(cli, "_demo", lambda args: pytest.fail("the demo ran"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile / "demo.zarr", afile / "sub" / "demo.zarr"):
        with pytest.raises(SystemExit) as info:
            main(["demo", "--n-sections", "3", "--out", str(out)])
        assert info.value.code == 2
        assert f"{afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "keep"
    # a path whose folders do not exist yet is fine (persist creates them)
    ran = []
    monkeypatch.setattr(cli, "_demo", lambda args: ran.append(args.out) or 0)
    assert main(["demo", "--out", str(tmp_path / "new" / "dir" / "demo.zarr")]) == 0
    assert ran and not (tmp_path / "new").exists()
