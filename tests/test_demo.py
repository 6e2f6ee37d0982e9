"""`robnet-svc demo` on a fresh machine: embedded digits, the whole pipeline, before/after table."""

from __future__ import annotations

import json

from cli_support import invoke


def test_demo_fast_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    r = invoke(capsys, "demo", "--fast", "--out", out, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert {"model.onnx", "model.robust.onnx", "certificate.h5", "summary.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads(r.out)
    assert summary == json.loads((out / "summary.json").read_text())
    before, after = summary["sections"]["before"], summary["sections"]["after"]
    assert after["certified_accuracy"] > before["certified_accuracy"]
    again = invoke(capsys, "demo", "--fast", "--out", out)
    assert again.code == 2 and "use --force" in again.err


def test_demo_refuses_a_bad_device_before_training(tmp_path, capsys):
    out = tmp_path / "demo"
    r = invoke(capsys, "demo", "--fast", "--out", out, "--device", "gpu")
    assert r.code == 2 and "--device 'gpu'" in r.err and len(r.err.strip().splitlines()) == 1
    assert not out.exists()
