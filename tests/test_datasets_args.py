"""Arguments of asign.datasets: wrong values fail up front with the argument's name."""

from __future__ import annotations

import pytest

from asign.datasets import download_her2st, her2st, synthetic_stack


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"um_per_px": 0}, ValueError, r"`um_per_px` must be > 0, got 0"),  # ZeroDivisionError before
        ({"um_per_px": -1.0}, ValueError, r"`um_per_px` must be > 0, got -1.0"),
        ({"um_per_px": float("nan")}, ValueError, r"`um_per_px` must be a finite number"),
        ({"um_per_px": "4"}, TypeError, r"`um_per_px` must be a number, got '4'"),
        ({"image_size": 0}, ValueError, r"`image_size` must be >= 1"),
        ({"image_size": 256.0}, TypeError, r"`image_size` must be an integer"),
        ({"n_sections": 2.5}, TypeError, r"`n_sections` must be an integer"),
        ({"dispersion": 0}, ValueError, r"`dispersion` must be > 0"),
        ({"thickness_um": -16.0}, ValueError, r"`thickness_um` must be >= 0"),
        ({"max_shift_um": float("inf")}, ValueError, r"`max_shift_um` must be a finite number"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0"),
    ],
)
def test_synthetic_stack_refuses_bad_numbers(kwargs, error, message):
    with pytest.raises(error, match=message):
        synthetic_stack(**{"n_sections": 2, "images": False, **kwargs})


def test_synthetic_stack_reports_fewer_spots_than_requested(asign_log):
    """Images that hold little of the tissue give far fewer spots than `n_spots`: a warning with the numbers (1 spot
    per section without a word before), and an error when a section gets none."""
    sd = synthetic_stack(n_sections=2, image_size=128, n_spots=20, n_genes=3, images=False)
    n = sd.tables["table"].obs["section"].value_counts(sort=False).tolist()
    assert max(n) < 10
    assert f"the sections have {n} spots instead of about n_spots=20" in asign_log.warnings
    assert "image_size * um_per_px >= 3680 µm" in asign_log.warnings
    with pytest.raises(ValueError, match=r"section S1 has no spot: its image \(16 px \* 4 µm/px = 64 µm a side\)"):
        synthetic_stack(n_sections=2, image_size=16, images=False)
    asign_log.records.clear()
    synthetic_stack(n_sections=2, n_spots=60, n_genes=3, image_size=512, um_per_px=8.0, images=False)
    assert not asign_log.warnings


def test_her2st_patient_must_be_a_letter(tmp_path, monkeypatch):
    import pooch

    monkeypatch.setattr(pooch, "retrieve", lambda *a, **kw: pytest.fail("downloaded"))
    with pytest.raises(TypeError, match=r"`patient` must be one of .* got None"):  # 'NONE' before
        download_her2st(None, cache=tmp_path)
    with pytest.raises(TypeError, match=r"`patient` must be one of .* got None"):
        her2st(None, path=tmp_path)
    with pytest.raises(ValueError, match=r"`sections` is empty"):
        download_her2st("C", sections=[], cache=tmp_path)


def test_her2st_path_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a HER2ST folder"):
        her2st("C", path=afile)


def test_download_without_network_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    """Offline, pooch raised requests' raw ConnectionError; now an OSError names the file, the URL and how to read a
    copy obtained otherwise."""
    import pooch
    import requests

    def offline(url, **kwargs):
        msg = "Failed to resolve 'github.com'"
        raise requests.exceptions.ConnectionError(msg)

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(OSError, match=r"Could not download HER2ST file 'data/ST-cnts/C2\.tsv\.gz' of patient C") as e:
        download_her2st("C", sections=["C2"], images=False, cache=tmp_path)
    assert "asign.io.read_her2st(path" in str(e.value) and "ConnectionError" in str(e.value)
