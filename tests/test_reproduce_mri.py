"""The MRI reproduction script (benchmarks/reproduce_mri.py): its command lines and network.
The runs themselves take hours (docs/results.md); this checks what they would run."""

from __future__ import annotations

import shlex

from benchmarks import reproduce_mri
from benchmarks.networks import NETWORKS
from robnet_svc.cli import harden_cmd


def test_dry_run_prints_one_valid_harden_command_per_row(capsys, tmp_path):
    assert reproduce_mri.main(["--dry-run", "--out", str(tmp_path / "mri"), "--data-dir", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 4 and not (tmp_path / "mri").exists()
    rows = set()
    for line in lines:
        args = shlex.split(line)
        assert args[:2] == ["robnet-svc", "harden"]
        p = harden_cmd.make_context("harden", args[2:]).params  # click accepts every option
        assert (p["order"], p["mode"], p["cert_method"], p["radius"], p["max_test"]) == (3, "mult", "rsip-ssip",
                                                                                        True, None)
        rows.add((p["method"], p["eps"]))
    assert rows == {(m, e) for m in ("rsip-ibp", "rsip-ssip") for e in (0.2, 0.4)}


def test_the_64_pixel_network_is_the_benchmarks_mri_64():
    ours, theirs = reproduce_mri.mri_network(64), NETWORKS["MRI-64"].build()
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    assert sum(p.numel() for p in reproduce_mri.mri_network(128).parameters()) > 566_260
