"""Reproduce the paper's MRI experiment (Table 3, ε = 0.2 and 0.4) with robnet-svc (issue 16).

    python -m benchmarks.reproduce_mri --dry-run              # print every command, run nothing
    python -m benchmarks.reproduce_mri                        # 64x64 on CPU (long: hours)
    python -m benchmarks.reproduce_mri --size 128 --device cuda --epochs 175

Steps (each skipped when its output exists, so an interrupted run continues; ``--force``
redoes them):

1. ``standard.onnx``: the MRI CNN trained normally (cross-entropy, Adam) on the training
   split of ``--data-dir`` at ``1 x size x size`` (the ``mri`` dataset plugin resizes);
2. for each method (``rsip-ibp``, ``rsip-ssip``) and ε (0.2, 0.4): ``robnet-svc harden``
   of ``standard.onnx`` against a third-order multiplicative bias field (the paper's
   box: constant term ``[1-ε, 1+ε]``, the 15 others ``[-ε/15, ε/15]``), the paper's
   schedule scaled to ``--epochs`` (ε ramped over 4/7 of them, learning rate 5e-4 then
   /10 and /100: robnet-svc's defaults), every model certified with ``rsip-ssip`` on all
   1311 test images (``before`` = the standard model, ``after`` = the hardened one), with
   ``--radius`` for the accuracy-vs-ε curves and ``report.html`` in each output folder;
3. ``results.json`` and ``results.md``: clean and certified accuracy of every row beside
   the paper's Table 3 numbers (copy ``results.md`` into docs/results.md).

The network: the paper's MRI network (9 layers, 17 M parameters, 128x128) is not
published; this is the benchmarks' ``MRI-64`` CNN (three stride-2 convolutions, two
linear layers), whose first linear layer grows with ``--size``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO / ".." / "shared" / "data" / "brain-tumor-mri").resolve()
METHODS = ("rsip-ibp", "rsip-ssip")
EPSILONS = (0.2, 0.4)
CLASSES = 4

#: The paper's Table 3 (ε in the paper's percent units; accuracies in %): test accuracy and
#: certified robustness (rsip-ssip, all test images) of the standard (Std), RSIP-IBP (RI) and
#: RSIP-SSIP (RS) trained networks, 128x128 inputs, 175 robust epochs on an RTX 3090.
PAPER_TABLE_3 = {
    1: {"clean": {"Std": 97.8, "RI": 98.2, "RS": 97.6}, "certified": {"Std": 97.7, "RI": 98.1, "RS": 97.5}},
    5: {"clean": {"Std": 97.8, "RI": 97.1, "RS": 97.9}, "certified": {"Std": 89.2, "RI": 95.6, "RS": 96.6}},
    10: {"clean": {"Std": 97.8, "RI": 97.2, "RS": 97.9}, "certified": {"Std": 17.4, "RI": 92.1, "RS": 96.1}},
    20: {"clean": {"Std": 97.8, "RI": 95.3, "RS": 98.0}, "certified": {"Std": 1.4, "RI": 71.2, "RS": 94.0}},
    40: {"clean": {"Std": 97.8, "RI": 87.4, "RS": 97.4}, "certified": {"Std": 0.0, "RI": 44.3, "RS": 96.6}},
}
PAPER_COLUMN = {"rsip-ibp": "RI", "rsip-ssip": "RS"}


def mri_network(size: int):
    """The MRI CNN at ``1 x size x size`` (size a multiple of 8); at 64 exactly ``benchmarks.networks.mri_cnn``."""
    from torch import nn

    side = size // 8
    return nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, CLASSES))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce_mri", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="Brain Tumor MRI folder (Training/, Testing/)")
    parser.add_argument("--out", default="results/mri", help="output folder (one sub-folder per row)")
    parser.add_argument("--size", type=int, default=64, help="image side: 64 on CPU, 128 (the paper's) on a GPU")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="standard training epochs (paper: 200)")
    parser.add_argument("--epochs", type=int, default=14,
                        help="robust epochs (paper: 175 = 100 ramp + 50 + 25; ramp = 4/7 of them)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--eps", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cert-batch-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training split (smoke runs)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="certify this many test images (default: all 1311, as the paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curves", type=int, default=None, metavar="N",
                        help="radius curves from a separate `certify --radius` of N evenly spaced test images per "
                             "model (the standard one once) instead of `--radius` on every test image in each row "
                             "(that costs about 7 certifications per row, twice; on CPU use e.g. --curves 262)")
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def harden_command(args: argparse.Namespace, model: Path, method: str, eps: float, out: Path) -> list[str]:
    """The ``robnet-svc harden`` command line of one table row."""
    command = ["robnet-svc", "harden", str(model), "--dataset", "mri", "--data-dir", str(args.data_dir),
               "--perturbation", "bias-field",
               "--eps", f"{eps:g}", "--order", "3", "--mode", "mult", "--method", method,
               "--cert-method", "rsip-ssip", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--cert-batch-size", str(args.cert_batch_size), "--device", args.device, "--seed", str(args.seed),
               # The paper trains without a clean-accuracy budget: keep the best validation epoch at ε.
               "--max-clean-drop", "none",
               "--out", str(out)]
    if args.curves is None:
        command += ["--radius", "--radius-max", f"{2 * eps:g}", "--radius-precision", f"{eps / 20:g}"]
    if args.max_train:
        command += ["--max-train", str(args.max_train)]
    if args.max_test:
        command += ["--max-test", str(args.max_test)]
    if args.force:
        command += ["--force"]
    return command


def curve_command(args: argparse.Namespace, model: Path, out: Path) -> list[str]:
    """``robnet-svc certify --radius`` of ``model`` on ``--curves`` evenly spaced test images, ε up to
    twice the largest row's (the accuracy-vs-ε curve; the ε it certifies at is the largest row's)."""
    top = max(args.eps)
    return ["robnet-svc", "certify", str(model), "--dataset", "mri", "--data-dir", str(args.data_dir),
            "--perturbation", "bias-field", "--eps", f"{top:g}", "--order", "3", "--mode", "mult",
            "--cert-method", "rsip-ssip", "--cert-batch-size", str(args.cert_batch_size), "--max-test",
            str(args.curves), "--radius", "--radius-max", f"{2 * top:g}", "--radius-precision", f"{top / 20:g}",
            "--device", args.device, "--seed", str(args.seed), "--out", str(out)]


def train_standard_model(args: argparse.Namespace, path: Path) -> None:
    """Step 1: the normally trained network, exported to ONNX."""
    import torch

    from robnet_svc.models import export_onnx
    from robnet_svc.plugins import load_registry
    from robnet_svc.training import train_standard

    splits = load_registry().dataset("mri")(args.data_dir).load((1, args.size, args.size))
    images, labels = splits.train_images, splits.train_labels
    if args.max_train:
        keep = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.max_train]
        images, labels = images[keep], labels[keep]
    torch.manual_seed(args.seed)
    model = mri_network(args.size)
    train_standard(model, images, labels, epochs=args.pretrain_epochs, lr=1e-3, seed=args.seed)
    export_onnx(model, (1, args.size, args.size), path)


def collect(rows: list[tuple[str, float, Path]]) -> dict:
    """Clean and certified accuracy (%) of every finished row, beside the paper's."""
    from robnet_svc.report import read_report

    out = []
    for method, eps, folder in rows:
        certificate = folder / "certificate.h5"
        if not certificate.is_file():
            continue
        report = read_report(certificate)
        before, after = (report.sections[s].summary() for s in ("before", "after"))
        paper = PAPER_TABLE_3[round(eps * 100)]
        column = PAPER_COLUMN[method]
        out.append({"method": method, "eps": eps, "num_samples": after["num_samples"],
                    "std_clean": 100 * before["clean_accuracy"], "std_certified": 100 * before["certified_accuracy"],
                    "clean": 100 * after["clean_accuracy"], "certified": 100 * after["certified_accuracy"],
                    "empirical": 100 * after["empirical_robust_accuracy"],
                    "paper_std_clean": paper["clean"]["Std"], "paper_std_certified": paper["certified"]["Std"],
                    "paper_clean": paper["clean"][column], "paper_certified": paper["certified"][column],
                    "seconds": float(sum(report.history.get("seconds", []))), "report": str(folder / "report")})
    return {"rows": out}


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [f"Measured at {args.size}x{args.size}, {args.epochs} robust epochs, certified with rsip-ssip.", "",
             "| method | ε | n | std clean % (paper) | std certified % (paper) | clean % (paper) | "
             "certified % (paper) | empirical robust % | training s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | {r['eps']:g} | {r['num_samples']} | {r['std_clean']:.1f} "
                     f"({r['paper_std_clean']}) | {r['std_certified']:.1f} ({r['paper_std_certified']}) | "
                     f"{r['clean']:.1f} ({r['paper_clean']}) | {r['certified']:.1f} ({r['paper_certified']}) | "
                     f"{r['empirical']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


#: the ε at which the curves table reports certified accuracy (the paper's Table 3 radii, up to 2× the largest)
CURVE_TABLE_EPS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)


def load_curves(curves: list[tuple[str, Path]]) -> list[tuple[str, object]]:
    """``(label, Report)`` of every finished ``certify --radius`` in ``curves`` (label, certificate path),
    read once for the table and the figure; unfinished runs are left out."""
    from robnet_svc.report import read_report

    return [(label, read_report(certificate)) for label, certificate in curves if certificate.is_file()]


def curve_rows(loaded: list[tuple[str, object]]) -> list[dict]:
    """Per loaded model: its label, the sample count and the certified and empirical robust
    accuracy (%) at ``CURVE_TABLE_EPS`` (up to the radius search's maximum)."""
    rows = []
    for label, report in loaded:
        certs, top = report.sections["model"], report.radius_settings["max"]
        eps = [e for e in CURVE_TABLE_EPS if e <= top + 1e-9]
        at = certs.accuracy_at(eps)
        rows.append({"model": label, "n": certs.num_samples, "eps": eps,
                     "certified": [100 * v for v in at["certified_accuracy"]],
                     "empirical": [100 * v for v in at["empirical_robust_accuracy"]]})
    return rows


def curves_markdown(rows: list[dict]) -> str:
    """Certified % (empirical robust % in brackets) at each ε, one row per model."""
    if not rows:
        return ""
    eps = max((r["eps"] for r in rows), key=len)
    lines = ["| model | n | " + " | ".join(f"ε = {e:g}" for e in eps) + " |", "|---|---" + "|---" * len(eps) + "|"]
    for r in rows:
        cells = [f"{c:.1f} ({m:.1f})" for c, m in zip(r["certified"], r["empirical"])]
        lines.append(f"| {r['model']} | {r['n']} | " + " | ".join(cells + ["—"] * (len(eps) - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def curves_figure(loaded: list[tuple[str, object]], path: Path, title: str) -> Path | None:
    """One figure of every loaded model's certified (solid) and empirical robust (dashed) accuracy
    against ε (step curves from the per-sample radii), written atomically to ``path`` with the
    report page's figure helpers; None when nothing is loaded."""
    import numpy as np

    from robnet_svc.atomic import atomic_path
    from robnet_svc.report import eps_grid
    from robnet_svc.report_plot import _figure, _png

    if not loaded:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for i, (label, report) in enumerate(loaded):
        at = report.sections["model"].accuracy_at(eps_grid(report.radius_settings["max"], 200))
        for key, style, what in (("certified_accuracy", "-", "certified"),
                                 ("empirical_robust_accuracy", "--", "empirical (attack)")):
            ax.step(at["eps"], 100 * np.asarray(at[key]), where="post", color=f"C{i}", linestyle=style,
                    label=f"{label}: {what}")
    ax.set_xlabel("radius ε of the order-3 multiplicative bias field")
    ax.set_ylabel(f"accuracy on {loaded[0][1].sections['model'].num_samples} test images (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_png(fig))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    model = out / "standard.onnx"
    rows = [(m, e, out / f"{m}-eps{e:g}") for e in args.eps for m in args.methods]
    commands = [harden_command(args, model, m, e, folder) for m, e, folder in rows]
    curves = []
    if args.curves is not None:
        curves = [(folder / "curves", curve_command(args, m, folder / "curves"))
                  for m, folder in [(model, out / "standard"), *((f / "model.robust.onnx", f) for _, _, f in rows)]]
    print(f"# 1. standard training: {args.pretrain_epochs} epochs at 1x{args.size}x{args.size} -> {model}")
    for command in commands + [c for _, c in curves]:
        print(shlex.join(command))
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.force or not model.exists():
        train_standard_model(args, model)
    steps = [(folder, command) for (_, _, folder), command in zip(rows, commands)] + curves
    for folder, command in steps:
        if (folder / "certificate.h5").exists() and not args.force:
            print(f"# {folder} is done; skipped")
            continue
        cli = [sys.executable, "-m", "robnet_svc.cli", *command[1:]]  # this checkout's robnet-svc
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        done = subprocess.run(cli, env={**os.environ, "PYTHONPATH": path})
        if done.returncode != 0:
            print(f"# {folder} failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
    results = collect(rows)
    loaded = load_curves([(label, folder / "certificate.h5") for label, (folder, _) in zip(
        ["standard", *(f"{m} ε={e:g}" for m, e, _ in rows)], curves)])
    results["curves"] = curve_rows(loaded)
    text = markdown(results, args)
    if loaded:
        figure = curves_figure(loaded, out / "curves.png",
                               f"MRI {args.size}x{args.size}: certified (rsip-ssip) and empirical robust accuracy")
        text += ("\nCertified accuracy % (empirical robust % in brackets) against ε; figure: "
                 f"{figure}\n\n" + curves_markdown(results["curves"]))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
