"""The third-party plugin path, exactly as a plugin author uses it (SPEC §7, issue 6).

The example distribution ``plugins/robnet-svc-vignette`` and a few deliberately broken ones
(written here) are installed with pip into temporary ``--target`` folders, once per test
session, and the CLI runs in a subprocess with ``PYTHONPATH`` pointing there, so
``importlib.metadata`` finds the real dist-info and entry points. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "robnet-svc-vignette"
EXAMPLE_DIST, EXAMPLE_EP, EXAMPLE_VERSION = "robnet-svc-vignette", "vignette", "0.1.0"


def _pip_install(sources: list[Path], target: Path) -> None:
    """Install distributions the way a user would, offline (no index, no build isolation)."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
           "--target", str(target), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """A folder where ``robnet-svc-vignette`` is pip-installed (from a copy: setuptools writes
    build/ and *.egg-info next to the sources, which must not land in the repository)."""
    root = tmp_path_factory.mktemp("example")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip_install([src], root / "site")
    return root / "site"


# Deliberately broken distributions: name -> {module file: source}; each gets an entry point
# ``<ep> = <module>`` in group robnet_svc.
_PERTURBATION = """
from robnet_svc.perturbations import Perturbation

class Clash(Perturbation):
    name = "vignette"
    description = "Same name as the example plugin's perturbation."
    def num_coeffs(self, image_shape):
        return 1
    def affine_set(self, images, eps=None):
        raise NotImplementedError
"""
BROKEN = {
    # raises on import
    "robnet-svc-broken": ("broken", "robnet_svc_broken", 'raise ImportError("needs libfoo, which is not installed")\n'),
    # registers a perturbation name that robnet-svc-vignette also registers
    "robnet-svc-clash": ("clash", "robnet_svc_clash", _PERTURBATION + """
from robnet_svc.hookspecs import hookimpl

@hookimpl
def robnet_register_perturbations(register):
    register(Clash)
"""),
    # registers something that is not a Perturbation subclass
    "robnet-svc-badclass": ("badclass", "robnet_svc_badclass", """
from robnet_svc.hookspecs import hookimpl

class NotAPerturbation:
    name = "not-a-perturbation"

@hookimpl
def robnet_register_perturbations(register):
    register(NotAPerturbation)
"""),
    # misspelled hook name (singular)
    "robnet-svc-typo": ("typo", "robnet_svc_typo", """
from robnet_svc.hookspecs import hookimpl

@hookimpl
def robnet_register_perturbation(register):
    pass
"""),
    # a valid plugin whose entry-point name another distribution (robnet-svc-badclass) uses too
    "robnet-svc-samename": ("badclass", "robnet_svc_samename", _PERTURBATION.replace('"vignette"', '"same-ep-name"') + """
from robnet_svc.hookspecs import hookimpl

@hookimpl
def robnet_register_perturbations(register):
    register(Clash)
"""),
    # returns the classes instead of calling register()
    "robnet-svc-returns": ("returns", "robnet_svc_returns", _PERTURBATION + """
from robnet_svc.hookspecs import hookimpl

@hookimpl
def robnet_register_perturbations(register):
    return [Clash]
"""),
}


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    """A folder where the broken distributions are pip-installed (one pip run)."""
    root = tmp_path_factory.mktemp("broken")
    sources = []
    for dist, (ep, module, code) in BROKEN.items():
        src = root / "src" / dist
        src.mkdir(parents=True)
        (src / f"{module}.py").write_text(textwrap.dedent(code))
        (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "9.9.{len(sources)}"
            dependencies = ["robnet-svc"]

            [project.entry-points.robnet_svc]
            {ep} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """))
        sources.append(src)
    _pip_install(sources, root / "site")
    return root / "site"


def run_cli(args: list[str], sites: list[Path], allow: str | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m robnet_svc ARGS`` with the plugin sites on PYTHONPATH; ``allow``: ROBNET_SVC_PLUGINS."""
    env = {k: v for k, v in os.environ.items() if k not in ("ROBNET_SVC_PLUGINS", "ROBNET_SVC_TRACE_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), *filter(None, [env.get("PYTHONPATH")])])
    if allow is not None:
        env["ROBNET_SVC_PLUGINS"] = allow
    return subprocess.run([sys.executable, "-m", "robnet_svc", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def tool_lines(stderr: str) -> list[str]:
    """robnet-svc's own stderr lines (Python warnings from third-party imports are not ours)."""
    return [line for line in stderr.splitlines() if line.startswith("robnet-svc:")]


def listing(args_sites, allow=None) -> dict:
    proc = run_cli(["plugins", "--json"], args_sites, allow)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def names(listing_json: dict, kind: str = "perturbations") -> dict[str, dict]:
    return {row["name"]: row for row in listing_json[kind]}


# --- the example distribution ---------------------------------------------------------------


def test_example_is_listed_with_its_distribution_and_version(example_site):
    data = listing([example_site])
    rows = names(data)
    for name in ("vignette", "colour-gain"):
        row = rows[name]
        assert (row["distribution"], row["version"], row["plugin"]) == (EXAMPLE_DIST, EXAMPLE_VERSION, EXAMPLE_EP)
        assert row["description"]
    assert rows["vignette"]["options"]["terms"] == {
        "type": "int", "default": 2, "help": "radial terms after the constant (r^2 ... r^(2*terms))",
        "choices": [1, 2, 3, 4]}
    assert rows["vignette"]["options"]["radial_scale"]["default"] is None
    assert rows["bias-field"]["distribution"] == "robnet-svc"  # built-ins still there
    plugin = next(p for p in data["plugins"] if p["name"] == EXAMPLE_EP)
    assert plugin == {"name": EXAMPLE_EP, "distribution": EXAMPLE_DIST, "version": EXAMPLE_VERSION,
                      "hooks": ["robnet_register_perturbations"]}
    assert data["broken"] == []


def test_empty_allow_list_loads_builtins_only(example_site):
    rows = names(listing([example_site], allow=""))
    assert "vignette" not in rows and "colour-gain" not in rows
    assert rows["bias-field"]["distribution"] == "robnet-svc"


def test_allow_list_by_entry_point_name(example_site):
    proc = run_cli(["plugins"], [example_site], allow=EXAMPLE_EP)  # the table output
    assert proc.returncode == 0, proc.stderr
    assert "vignette" in proc.stdout and "colour-gain" in proc.stdout and EXAMPLE_DIST in proc.stdout
    assert tool_lines(proc.stderr) == []


def test_allow_list_by_distribution_name_reports_unknown_names(example_site):
    data = listing([example_site], allow="Robnet_Svc_Vignette, no-such-plugin")  # normalised like pip does
    assert names(data)["vignette"]["distribution"] == EXAMPLE_DIST
    [line] = data["broken"]  # a name in the list that matches nothing is reported, not ignored
    assert "ROBNET_SVC_PLUGINS names 'no-such-plugin'" in line and EXAMPLE_EP in line


# --- broken plugins ---------------------------------------------------------------------------


def test_plugin_raising_on_import_is_one_line_and_the_rest_still_load(example_site, broken_site):
    proc = run_cli(["plugins", "--json"], [example_site, broken_site], allow=f"{EXAMPLE_EP},robnet-svc-broken")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = tool_lines(proc.stderr)
    assert "plugin 'broken' from robnet-svc-broken 9.9.0 failed to import" in line
    assert "ImportError: needs libfoo" in line
    data = json.loads(proc.stdout)
    assert names(data)["vignette"]["distribution"] == EXAMPLE_DIST
    assert len(data["broken"]) == 1


def test_unknown_name_error_mentions_the_broken_plugin(broken_site, tmp_path):
    # The broken plugin may have been the one meant to provide the name: the error says so.
    if not (REPO / "robnet_svc" / "pipeline.py").exists():
        pytest.skip("harden not available yet")
    proc = run_cli(["harden", str(tmp_path / "m.onnx"), "--perturbation", "nothing-like-this",
                    "--out", str(tmp_path / "run")], [broken_site], allow="robnet-svc-broken")
    assert proc.returncode == 2, proc.stderr
    [line] = tool_lines(proc.stderr)
    assert "unknown perturbation 'nothing-like-this'; known: bias-field" in line
    assert "1 plugin(s) failed to load: plugin 'broken' from robnet-svc-broken" in line
    assert not (tmp_path / "run").exists()


def test_two_distributions_registering_the_same_name_is_an_error_naming_both(example_site, broken_site):
    proc = run_cli(["plugins"], [example_site, broken_site], allow=f"{EXAMPLE_EP},robnet-svc-clash")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = tool_lines(proc.stderr)
    assert line.startswith("robnet-svc: error: perturbation 'vignette' is registered twice")
    assert EXAMPLE_DIST in line and "robnet-svc-clash" in line and "ROBNET_SVC_PLUGINS" in line


def test_invalid_registrations_are_one_line_each_naming_the_plugin(broken_site):
    proc = run_cli(["plugins", "--json"], [broken_site],
                   allow="robnet-svc-badclass,robnet-svc-typo,robnet-svc-returns,robnet-svc-samename")
    assert proc.returncode == 0, proc.stderr
    lines = tool_lines(proc.stderr)
    assert len(lines) == 3, lines
    by_plugin = {p: next(line for line in lines if f"plugin {p!r}" in line) for p in ("badclass", "typo", "returns")}
    assert "from robnet-svc-badclass" in by_plugin["badclass"]
    assert "NotAPerturbation" in by_plugin["badclass"] and "Perturbation subclass" in by_plugin["badclass"]
    assert "unknown hook(s) robnet_register_perturbation " in by_plugin["typo"]
    assert "returned [" in by_plugin["returns"] and "call register(" in by_plugin["returns"]
    data = json.loads(proc.stdout)
    assert "not-a-perturbation" not in names(data) and "vignette" not in names(data)
    assert names(data)["bias-field"]["distribution"] == "robnet-svc"
    # the second distribution using the entry-point name 'badclass' still loads, under a qualified name
    same = names(data)["same-ep-name"]
    assert (same["distribution"], same["plugin"]) == ("robnet-svc-samename", "badclass@robnet-svc-samename")
    assert [p["name"] for p in data["plugins"]][-1] == "badclass@robnet-svc-samename"


# --- the example perturbations themselves (imported from the installed copy) ------------------


@pytest.fixture
def example_registry(example_site, monkeypatch):
    """The registry with the installed example, loaded in-process through its entry point."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setenv("ROBNET_SVC_PLUGINS", EXAMPLE_EP)
    from robnet_svc.plugins import load_registry

    registry = load_registry()
    assert registry.perturbations["vignette"].dist == EXAMPLE_DIST
    return registry


def test_vignette_affine_set(example_registry):
    vignette = example_registry.perturbation("vignette")(0.2)
    x = torch.rand(3, 2, 9, 7, dtype=torch.float64)
    aset = vignette.affine_set(x)
    assert aset.weights.shape == (3, 3, 2, 9, 7) and aset.num_coeffs == vignette.num_coeffs((2, 9, 7)) == 3
    assert torch.allclose(aset.images(aset.nominal.unsqueeze(1)).squeeze(1), x)  # nominal: clean image
    assert torch.allclose(aset.lower[:, 0], torch.tensor(0.8, dtype=x.dtype))
    assert torch.allclose(aset.upper[:, 1:], torch.tensor(0.1, dtype=x.dtype))  # eps / terms
    field = aset.images(aset.sample(64)) / x.unsqueeze(1)  # the multiplicative field itself
    assert field.min() >= 1 - 2 * 0.2 - 1e-9 and field.max() <= 1 + 2 * 0.2 + 1e-9
    assert torch.allclose(field[..., 0, :, :], field[..., 1, :, :])  # same field in every channel
    # radial: symmetric under flips, constant-term only at the centre pixel
    assert torch.allclose(field, field.flip(-1)) and torch.allclose(field, field.flip(-2))
    coeffs = aset.sample(8)
    centre = aset.images(coeffs)[..., 4, 3] / x[:, None, :, 4, 3]  # [B, 8, C]
    assert torch.allclose(centre, coeffs[:, :, None, 0].expand(-1, -1, 2))
    point = vignette.affine_set(x, eps=0.0)
    assert torch.equal(point.lower, point.upper)
    assert vignette.coeff_names((2, 9, 7)) == ["a_const", "a_r2", "a_r4"]


def test_colour_gain_affine_set(example_registry):
    gain = example_registry.perturbation("colour-gain")(0.1)
    x = torch.rand(2, 3, 5, 4)
    aset = gain.affine_set(x)
    assert aset.weights.shape == (2, 3, 3, 5, 4)
    g = torch.tensor([[0.9, 1.0, 1.1], [1.1, 1.1, 0.9]])
    assert torch.allclose(aset.images(g.unsqueeze(1)).squeeze(1), x * g[:, :, None, None])
    centre, radius = aset.center_radius()
    assert torch.allclose(centre, x) and torch.allclose(radius, 0.1 * x)


def test_bad_options_are_one_line_errors(example_registry):
    from robnet_svc.errors import RobnetError

    cls = example_registry.perturbation("vignette")
    with pytest.raises(RobnetError, match="option 'terms' of perturbation 'vignette' must be one of"):
        cls(0.1, terms=9)
    with pytest.raises(RobnetError, match="option 'radial_scale' of perturbation 'vignette' must be > 0"):
        cls(0.1, radial_scale=-1)
    with pytest.raises(RobnetError, match="perturbation 'vignette' has no option 'order'; known: radial_scale, terms"):
        cls(0.1, order=2)
    with pytest.raises(RobnetError, match="needs images"):
        cls(0.1).affine_set(torch.rand(3, 4))


# --- bounds: sound for every bound method -----------------------------------------------------


def _engine():
    try:
        from robnet_svc.bounds import compile_network  # noqa: F401
    except ImportError:
        pytest.skip("bound engine (robnet_svc.bounds.compile_network) not available yet")
    return compile_network


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("perturbation", ["vignette", "colour-gain"])
def test_example_bounds_are_sound_for_every_method(example_registry, perturbation, device):
    compile_network = _engine()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5)).double().eval().to(device)
    net = compile_network(model, example_registry.rules())
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 1, 2, 3], device=device)
    aset = example_registry.perturbation(perturbation)(0.3).affine_set(x)
    coeffs = aset.sample(256, generator=torch.Generator(device=device).manual_seed(1))  # [B, S, k]
    with torch.no_grad():
        logits = model(aset.clipped(aset.images(coeffs)).reshape(-1, 3, 6, 6)).reshape(4, 256, 5)
    true = logits.gather(2, labels[:, None, None].expand(-1, 256, 1))
    others = torch.stack([torch.cat([row[:, :c], row[:, c + 1:]], dim=1) for row, c in zip(logits, labels)])
    sampled_min = (true - others).min(dim=1).values  # [B, K-1], classes i != label in increasing i
    methods = sorted(example_registry.bound_methods)
    assert {"ibp", "ssip", "rsip-ibp", "rsip-ssip"} <= set(methods)
    for name in methods:
        bound = example_registry.bound_method(name)().margin_lower(net, aset, labels)
        assert bound.shape == (4, 4) and bound.device == x.device, name
        assert torch.isfinite(bound).all(), name
        assert (bound <= sampled_min + 1e-9).all(), f"{name}: bound above a sampled margin"


# --- end to end: a one-epoch harden with the plugin's perturbation ----------------------------


def _tiny_digits_onnx(path: Path) -> None:
    """A tiny CNN for the embedded 8x8 grey digits, exported with the legacy exporter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)


def test_harden_one_epoch_with_the_plugin_perturbation(example_site, tmp_path):
    if not (REPO / "robnet_svc" / "pipeline.py").exists():
        pytest.skip("harden not available yet")
    model = tmp_path / "tiny.onnx"
    _tiny_digits_onnx(model)
    out = tmp_path / "run"
    proc = run_cli(["harden", str(model), "--dataset", "digits", "--perturbation", "vignette", "--eps", "0.05",
                    "--epochs", "1", "--max-train", "64", "--max-test", "16", "--device", "cpu",
                    "--out", str(out)], [example_site], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "model.robust.onnx").is_file() and (out / "certificate.h5").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "vignette" in json.dumps(summary)


def test_certify_sets_the_plugin_options_from_the_command_line(example_registry, tmp_path, capsys):
    """The installed plugin's own option names reach it from --perturbation-option and from the
    config file's [perturbation_options] (the flag wins for its key) and are recorded."""
    import h5py

    from cli_support import invoke

    model = tmp_path / "tiny.onnx"
    _tiny_digits_onnx(model)
    config = tmp_path / "run.toml"
    config.write_text("[perturbation_options]\nradial_scale = 6\nterms = 1\n")
    r = invoke(capsys, "certify", model, "--dataset", "digits", "--perturbation", "vignette", "--eps", "0.05",
               "--max-test", "8", "--cert-method", "ibp", "--attack-steps", "0", "--attack-restarts", "0",
               "--device", "cpu", "--perturbation-option", "terms=4", "--config", config, "--out", tmp_path / "out",
               "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["perturbation"] == {"name": "vignette", "eps": 0.05, "clip": [0.0, 1.0],
                                                 "terms": 4, "radial_scale": 6.0}
    with h5py.File(tmp_path / "out" / "certificate.h5") as f:
        assert json.loads(f["provenance"].attrs["coeff_names_json"]) == ["a_const", "a_r2", "a_r4", "a_r6", "a_r8"]
        assert json.loads(f["provenance"].attrs["config_json"])["perturbation_options"] == {
            "terms": 4, "radial_scale": 6.0}


def test_bad_plugin_options_on_the_command_line_are_one_line_exit_2(example_registry, tmp_path, capsys):
    from cli_support import invoke

    model = tmp_path / "tiny.onnx"
    _tiny_digits_onnx(model)
    for option, needle in [("terms=7", "option 'terms' of perturbation 'vignette' must be one of 1, 2, 3, 4, got 7"),
                           ("terms=two", "option terms='two' of perturbation 'vignette' is not a valid int"),
                           ("depth=2", "perturbation 'vignette' has no option 'depth'; known: radial_scale, terms")]:
        r = invoke(capsys, "certify", model, "--perturbation", "vignette", "--perturbation-option", option,
                   "--device", "cpu")
        assert r.code == 2 and len(tool_lines(r.err)) == 1 and needle in r.err, r.err
