"""Pictures of a real certificate: ``harden`` writes report/ by default, ``report plot`` draws
any certificate; the page is self-contained (every PNG embedded) and the PNGs decode."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import FAST, FAST_TRAIN, digits_model, invoke
from robnet_svc.report import read_report

FIGURES = {"accuracy_vs_eps.png", "per_class.png", "history.png", "samples.png"}


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """``harden --radius`` on the tiny digits model (the report page is on by default)."""
    folder = tmp_path_factory.mktemp("plot")
    model = digits_model(folder / "m.onnx")
    out = folder / "out"
    from robnet_svc.cli import main

    try:  # main directly: invoke's capsys is function-scoped
        main(["harden", str(model), *FAST, *FAST_TRAIN, "--radius", "--radius-max", "0.3",
              "--radius-precision", "0.05", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code, exc.code
    return model, out


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _decodes(data: bytes) -> tuple[int, ...]:
    from matplotlib.image import imread

    return imread(io.BytesIO(data), format="png").shape


def test_harden_writes_a_self_contained_page(hardened):
    _model, out = hardened
    folder = out / "report"
    assert {p.name for p in folder.iterdir()} == FIGURES | {"report.html"}
    page = (folder / "report.html").read_text()
    images = _embedded(page)
    assert sorted(images) == sorted((folder / name).read_bytes() for name in FIGURES)  # every figure, inline
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing it would have to load from elsewhere
    for data in images:
        height, width, _ = _decodes(data)
        assert height > 200 and width > 300
    assert "Certified accuracy (%) at ε" in page and "before" in page and "after" in page


def test_report_plot_draws_chosen_samples_and_checks_its_inputs(hardened, tmp_path, capsys):
    model, out = hardened
    certificate = out / "certificate.h5"
    index = read_report(certificate).sections["after"].index
    drawn = invoke(capsys, "report", "plot", certificate, "--out", tmp_path / "a", "--samples",
                   f"{index[0]},{index[3]}")
    assert drawn.code == 0, drawn.err
    assert _decodes((tmp_path / "a" / "samples.png").read_bytes())[0] < _decodes(
        (out / "report" / "samples.png").read_bytes())[0]  # 2 rows instead of 6

    missing = invoke(capsys, "report", "plot", certificate, "--out", tmp_path / "b", "--samples", "99999")
    assert missing.code == 2 and "test sample 99999 is not in the certificate" in missing.err

    moved = tmp_path / "moved.onnx"
    shutil.copy(model, moved)
    copy = tmp_path / "certificate.h5"
    shutil.copy(certificate, copy)
    model.rename(model.with_suffix(".gone"))
    try:
        lost = invoke(capsys, "report", "plot", copy, "--out", tmp_path / "c")
        assert lost.code == 2 and "--model before=PATH" in lost.err and "Traceback" not in lost.err
        found = invoke(capsys, "report", "plot", copy, "--out", tmp_path / "c", "--model", f"before={moved}",
                       "--num-samples", "1")
        assert found.code == 0, found.err
        wrong = invoke(capsys, "report", "plot", copy, "--out", tmp_path / "d", "--model",
                       f"before={out / 'model.robust.onnx'}")
        assert wrong.code == 2 and "is not the model of section 'before'" in wrong.err
    finally:
        model.with_suffix(".gone").rename(model)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())

    plain = invoke(capsys, "report", "plot", certificate, "--out", tmp_path / "e", "--no-samples")
    assert plain.code == 0 and not (tmp_path / "e" / "samples.png").exists()


def test_harden_without_the_page(tmp_path, capsys):
    model = digits_model(tmp_path / "m.onnx", epochs=1)
    run = invoke(capsys, "harden", model, *FAST, *FAST_TRAIN, "--no-report-page", "--out", tmp_path / "out")
    assert run.code == 0, run.err
    assert not (tmp_path / "out" / "report").exists()


def test_report_show_does_not_import_matplotlib(hardened):
    _model, out = hardened
    code = ("import sys; from robnet_svc.cli import main\n"
            "try: main(['report', 'show', sys.argv[1]])\n"
            "except SystemExit as e: assert not e.code\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, str(out / "certificate.h5")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
