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
