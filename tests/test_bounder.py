"""The bounding object (robnet_svc/bounder.py): the method's compatibility contract, op rules
from the registry (plugins' included), and the pipeline's certificate against the engine."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_support import FAST, invoke
from robnet_svc.bounder import Bounder
from robnet_svc.bounds import compile_network
from robnet_svc.certify import BOUND_DTYPE
from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io import load_model
from robnet_svc.plugins import load_registry
from robnet_svc.precision import full_precision
from robnet_svc.report import read_report
from robnet_svc.rounding import margin_allowance


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).eval()


def test_the_method_contract_check_refuses_dense_methods_for_linf():
    registry = load_registry()
    linf, bias = registry.perturbation("linf")(0.1), registry.perturbation("bias-field")(0.1, order=1)
    for name in ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip"):
        method = registry.bound_method(name)()
        assert method.check(bias, (1, 4, 4)) is None
        reason = method.check(linf, (1, 4, 4))
        assert (reason is not None) == method.needs_dense, name
        if reason is not None:
            assert reason == "needs a small number of perturbation coefficients; perturbation 'linf' has 16"
            with pytest.raises(RobnetError, match=f"^bound method '{name}' needs a small number"):
                Bounder(_net(), method, linf, (1, 4, 4))


def test_the_training_bounder_shares_the_network_and_is_never_tighter():
    registry = load_registry()
    pert = registry.perturbation("bias-field")(0.2, order=1)
    certifier = Bounder(_net(), registry.bound_method("rsip-ssip")(), pert, (1, 4, 4))
    trainer = Bounder(certifier.net, registry.bound_method("rsip-ssip")(ordered=False), pert, (1, 4, 4))
    assert trainer.net is certifier.net and trainer.module is certifier.module
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    ordered, loose = certifier.margin_lower(x, y), trainer.margin_lower(x, y)
    assert ordered.shape == (6, 2) and (ordered >= loose - 1e-6).all()
    coeffs = pert.affine_set(x).sample(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # both sound: below every sampled margin
        aset = pert.affine_set(x)
        logits = certifier.module(aset.clipped(aset.images(coeffs)).reshape(-1, 1, 4, 4)).reshape(6, 64, 3)
    true = logits.gather(2, y[:, None, None].expand(-1, 64, 1))
    sampled = torch.stack([torch.cat([r[:, :c], r[:, c + 1:]], 1) for r, c in zip(true - logits, y)]).min(1).values
    assert (ordered <= sampled + 1e-5).all()


_PLUGIN = '''
    import torch
    from robnet_svc.bounds.ops.base import AffineRule
    from robnet_svc.hookspecs import hookimpl


    class Triple(torch.nn.Module):
        def forward(self, x):
            return 3 * x


    class TripleRule(AffineRule):
        has_bias = False

        def abs_linear(self, rad):
            return 3 * rad


    @hookimpl
    def robnet_register_op_rules(register):
        register(Triple, TripleRule)
'''


def test_compiling_without_a_table_uses_the_plugins_op_rules(tmp_path, monkeypatch):
    """A real (tiny) installed distribution whose entry point registers an op rule: compiling
    with no explicit table takes it (the registry), as the pipeline does."""
    (tmp_path / "triple_rule_plugin.py").write_text(textwrap.dedent(_PLUGIN))
    info = tmp_path / "robnet_svc_triple-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robnet-svc-triple\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[robnet_svc]\ntriple = triple_rule_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ROBNET_SVC_PLUGINS", raising=False)
    from triple_rule_plugin import Triple

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), Triple(), nn.ReLU(), nn.Linear(4, 3)).eval()
    pert = load_registry().perturbation("brightness")(0.1)
    bounder = Bounder(model, load_registry().bound_method("rsip-ibp")(), pert, (1, 4, 4))
    assert Triple in load_registry().rules() and isinstance(compile_network(model), type(bounder.net))
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        bound = bounder.margin_lower(x, torch.tensor([0, 1]))
        logits = model(x)
    assert (bound <= torch.stack([logits[0, 0] - logits[0, 1:], logits[1, 1] - logits[1, [0, 2]]]) + 1e-6).all()


def test_the_pipelines_certificate_is_the_engines_bound(digits_onnx, tmp_path, capsys):
    """``robnet-svc certify`` on a small digits model stores, for every sample, exactly what the
    low-level engine computes: the method's float64 bound over the perturbation's set, the
    rounding allowance, and the decision (the seam between pipeline and engine changes nothing)."""
    model = digits_onnx
    run = invoke(capsys, "certify", model, *FAST, "--cert-method", "rsip-ssip", "--out", tmp_path / "out")
    assert run.code == 0, run.err
    section = read_report(tmp_path / "out" / "certificate.h5").sections["model"]

    registry = load_registry()
    imported = load_model(model)
    splits = registry.dataset("digits")(None).load(imported.image_shape)
    index = torch.from_numpy(section.index)
    x, y = splits.test_images[index], splits.test_labels[index]
    module = imported.module.eval()
    with torch.no_grad(), full_precision():
        net64 = compile_network(copy.deepcopy(module).to(BOUND_DTYPE), rules=registry.rules())
        aset = registry.perturbation("bias-field")(0.05, order=1).affine_set(x.to(BOUND_DTYPE))
        lower = registry.bound_method("rsip-ssip")().margin_lower(net64, aset, y)
        allowance = margin_allowance(net64, aset, y, torch.float32, symbolic=True)  # rsip-ssip: SSIP magnitudes
        prediction = module(x).argmax(-1)
    np.testing.assert_array_equal(section.margin_lower, lower.numpy())
    np.testing.assert_array_equal(section.rounding_allowance, allowance.numpy())
    certified = (prediction == y) & (lower > allowance).all(-1)
    np.testing.assert_array_equal(section.certified, certified.numpy())
    assert section.certified.any() and not section.certified.all()  # both kinds: a meaningful comparison


_ALLOCATOR_PROBE = """
import sys, torch
from robnet_svc.bounds import alloc
from robnet_svc.bounder import Bounder
from robnet_svc.plugins import load_registry

registry = load_registry()
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
bounder = Bounder(net, registry.bound_method("ibp")(), registry.perturbation("brightness")(0.1), (1, 4, 4))
bounder.margin_lower(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
print("library", alloc._state.get("tuned"))
from robnet_svc.cli import main
try:  # the command opts in at its start, before it checks its input (a missing model: exit 2)
    main(["certify", "no-such-model.onnx", "--dataset", "digits"])
except SystemExit as exc:
    assert exc.code == 2, exc.code
print("command line", alloc._state.get("tuned"))
"""


def test_allocator_tuning_is_the_command_lines_opt_in_not_the_librarys(tmp_path):
    """Computing bounds from the library leaves the process's allocator alone; the command line
    opts in at its start (robnet_svc/bounds/alloc.py). A fresh process each: the tuning is per process."""
    import os
    import platform
    import subprocess
    import sys

    env = {**os.environ, "ROBNET_SVC_MALLOC_TUNING": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith(("library", "command line"))]
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert lines == ["library None", f"command line {glibc}"]
