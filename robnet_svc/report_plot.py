"""Pictures of a certificate: PNG figures and one self-contained HTML page.

``write_page(report, out_dir, source=...)`` writes into ``out_dir``:

- ``accuracy_vs_eps.png``: certified and empirical robust accuracy against the radius ε, one
  colour per section (before/after hardening); step curves from the per-sample radii when the
  certificate has them (``--radius``), else the single certified ε;
- ``per_class.png``: clean and certified accuracy of every class, per section;
- ``history.png`` (harden): loss, accuracies and the ε ramp / learning rate per epoch;
- ``samples.png``: for chosen (or the worst) test samples, the clean image, the worst bias
  field the attack found and the perturbed image with the model's predictions, per section;
  it needs the test images and the models (``SampleSource``, see ``load_source``);
- ``report.html``: all of the above embedded as base64 PNGs, with the summary and the
  provenance; it references no other file, so it opens from disk anywhere.

matplotlib is imported here only (through ``matplotlib.figure.Figure`` and the Agg canvas,
never pyplot: no global backend state), and this module only by the commands that draw,
so ``report show`` does not pay for it.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robnet_svc.atomic import atomic_path
from robnet_svc.errors import RobnetError
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.report import eps_grid

PAGE_FILE = "report.html"
#: Test samples drawn when none are chosen.
DEFAULT_WORST = 6
#: ε points of the accuracy-vs-ε step curves.
CURVE_POINTS = 401
DPI = 110
COLOURS = {"before": "#888888", "after": "#1f77b4", "model": "#1f77b4"}


@dataclass
class SampleSource:
    """What re-computing the sample pictures needs: the test split and each section's model."""

    images: Any                     # torch.Tensor [N_test, C, H, W] in the data range
    labels: Any                     # torch.Tensor [N_test]
    modules: dict[str, Any]         # section -> classifier (torch module, eval mode, CPU)
    perturbation: Any               # the certificate's Perturbation (at its ε)
    origin: str = ""                # where images and models came from (shown on the page)


# --------------------------------------------------------------------------- loading what samples need


def load_source(report, *, models: dict[str, str] | None = None, dataset: str | None = None,
                data_dir: str | None = None, splits=None, reporter: Reporter = SILENT) -> SampleSource:
    """The test images and the section models of ``report``.

    Defaults come from the certificate: each section's ``model`` attribute, and the
    ``dataset``, ``data_dir`` and ``dataset_option`` of its effective config; ``models``
    (section -> path), ``dataset`` and ``data_dir`` override them; ``splits``: already
    loaded ``datasets.Splits`` (``harden``). Every model must be the file the section was
    computed on (same sha256) and the test labels must match the certificate's:
    RobnetError (one line) otherwise. ``reporter``: where loading the dataset reports.
    """
    import torch

    from robnet_svc.plugin_options import parse_pairs
    from robnet_svc.onnx_io import load_model
    from robnet_svc.plugins import load_registry

    config = report.provenance.config
    image_shape = report.provenance.image_shape
    registry = load_registry()
    perturbation = perturbation_of(report, registry)
    modules = {}
    for section in report.sections:
        path = (models or {}).get(section) or report.section_attrs.get(section, {}).get("model")
        if not path or not Path(path).is_file():
            raise RobnetError(f"the model of section {section!r} ({path or 'not recorded'}) is not there; "
                              f"give it with --model {section}=PATH")
        imported = load_model(path, image_shape=config.get("image_shape"), check_parity=False)
        expected = report.section_attrs.get(section, {}).get("model_sha256")
        if expected and imported.sha256 != expected:
            raise RobnetError(f"{path} is not the model of section {section!r} (sha256 {imported.sha256[:12]}..., "
                              f"the certificate says {expected[:12]}...)")
        modules[section] = imported.module.eval().to("cpu")
    if splits is None:
        name = dataset or config.get("dataset") or report.provenance.dataset
        folder = data_dir if data_dir is not None else config.get("data_dir")
        dataset_cls = registry.dataset(name)
        if dataset_cls.needs_data_dir and not folder:
            raise RobnetError(f"dataset {name!r} needs --data-dir (the certificate records none)")
        if folder and not Path(folder).is_dir():
            raise RobnetError(f"--data-dir {folder} is not a folder")
        given = config.get("dataset_options") or parse_pairs(config.get("dataset_option") or ())  # demo: a dict
        splits = dataset_cls(folder, **given).load(image_shape, reporter=reporter)
        origin = f"dataset {name!r}" + (f" in {folder}" if folder else "")
    else:
        origin = "the run's own test split"
    images, labels = splits.test_images, splits.test_labels
    for section, certs in report.sections.items():
        if certs.num_samples and (int(certs.index.max()) >= labels.shape[0]
                                  or not np.array_equal(labels[torch.as_tensor(certs.index)].numpy(), certs.label)):
            raise RobnetError(f"the test split of {origin} does not match the certificate's labels "
                              f"(section {section!r}); give the dataset it was computed on")
    models_text = ", ".join(f"{s}: {report.section_attrs.get(s, {}).get('model', '?')}" for s in modules)
    return SampleSource(images, labels, modules, perturbation, origin=f"{origin}; models {models_text}")


def perturbation_of(report, registry=None):
    """The certificate's perturbation, rebuilt from its recorded description."""
    from robnet_svc.plugins import load_registry

    spec = dict(report.provenance.perturbation)
    registry = registry or load_registry()
    name, eps = spec.pop("name"), spec.pop("eps")
    clip = spec.pop("clip", None)
    cls = registry.perturbation(name)
    return cls(eps, clip=tuple(clip) if clip else None, **{k: v for k, v in spec.items() if k in cls.options})


# --------------------------------------------------------------------------- the page


def write_page(report, out_dir: str | Path, *, source: SampleSource | None = None,
               samples: list[int] | None = None, num_worst: int = DEFAULT_WORST,
               note: str = "") -> Path:
    """Write the PNG figures and ``report.html`` into ``out_dir`` (created; files replaced);
    return the page's path. ``samples``: test-split positions to draw (default: the
    ``num_worst`` worst); ``source`` None: no sample pictures (``note`` says why)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, bytes]] = []  # (file name, caption, PNG bytes)
    figures.append(("accuracy_vs_eps.png", _curve_caption(report), _png(accuracy_figure(report))))
    figures.append(("per_class.png", "Clean (light) and certified (dark) accuracy of each class.",
                    _png(per_class_figure(report))))
    if report.history and len(next(iter(report.history.values()))):
        figures.append(("history.png", "Robust fine-tuning, per epoch: losses (batch means), accuracies "
                        "(training at the ramped ε, validation at the target ε) and the ε ramp with the "
                        "learning rate.", _png(history_figure(report))))
    notes = [note] if note else []
    if source is not None:
        chosen = choose_samples(report, samples, num_worst)
        if chosen:
            figures.append(("samples.png", _samples_caption(report, samples is None, source),
                            _png(samples_figure(report, source, chosen))))
    elif not notes:
        notes.append("Sample pictures need the test images and the models (see robnet-svc report plot --help).")
    if source is not None and not _has_points(report):
        notes.append("This certificate (format 1) has no attack points: no sample pictures.")
    for name, _caption, data in figures:
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    page = out / PAGE_FILE
    with atomic_path(page) as tmp:
        tmp.write_text(_html(report, figures, notes), encoding="utf-8")
    return page


def choose_samples(report, samples: list[int] | None, num_worst: int) -> list[int]:
    """Positions in the test split: ``samples`` (RobnetError for one the certificate does not
    hold), else the ``num_worst`` correctly classified samples with the smallest attack margin
    in the last section (the ones the attack broke, or came closest to breaking)."""
    if not _has_points(report):
        return []
    last = list(report.sections.values())[-1]
    if samples is not None:
        missing = sorted(set(samples) - set(last.index.tolist()))
        if missing:
            raise RobnetError(f"--samples: test sample {missing[0]} is not in the certificate "
                              f"(it holds {last.num_samples} samples, e.g. {last.index[:5].tolist()})")
        return list(samples)
    correct = last.prediction == last.label
    pool = np.flatnonzero(correct) if correct.any() else np.arange(last.num_samples)
    order = pool[np.argsort(last.attack_margin[pool], kind="stable")]
    return last.index[order[:num_worst]].tolist()


def _has_points(report) -> bool:
    return all(c.attack_coeffs is not None for c in report.sections.values())


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _eps_label(report) -> str:
    spec = report.provenance.perturbation
    details = ", ".join(f"{k} {spec[k]}" for k in ("order", "mode") if spec.get(k) is not None)
    return f"radius ε ({spec.get('name', '?')}" + (f", {details}" if details else "") + ")"


def _cert_eps(report) -> float:
    return float(report.provenance.perturbation.get("eps", float("nan")))


def accuracy_figure(report):
    """Certified (solid) and empirical robust (dashed) accuracy against ε, per section."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    eps0 = _cert_eps(report)
    settings = report.radius_settings
    for name, certs in report.sections.items():
        colour = COLOURS.get(name, None)
        s = certs.summary()
        if certs.radius is not None and settings is not None:
            grid = eps_grid(settings["max"], CURVE_POINTS - 1)
            curve = certs.accuracy_at(grid)
            ax.step(grid, 100 * np.asarray(curve["certified_accuracy"]), where="post", color=colour,
                    label=f"{name}: certified")
            ax.step(grid, 100 * np.asarray(curve["empirical_robust_accuracy"]), where="post", color=colour,
                    linestyle="--", label=f"{name}: empirical (attack)")
            ax.plot([eps0], [100 * s["certified_accuracy"]], "o", color=colour, markersize=4)  # fixed-ε flags
        else:
            # two measured points only (ε = 0 is the clean accuracy): no line suggests values in between
            ax.plot([0, eps0], [100 * s["clean_accuracy"], 100 * s["certified_accuracy"]], "o", color=colour,
                    label=f"{name}: certified")
            ax.plot([0, eps0], [100 * s["clean_accuracy"], 100 * s["empirical_robust_accuracy"]], "s",
                    color=colour, markerfacecolor="none", markersize=9, label=f"{name}: empirical (attack)")
            ax.set_xlim(-0.05 * eps0, 1.15 * eps0)
    ax.axvline(eps0, color="black", linestyle=":", linewidth=1, label=f"certified ε = {eps0:g}")
    ax.set_xlabel(_eps_label(report))
    ax.set_ylabel("accuracy on the test samples (%)")
    ax.set_ylim(-2, 102)
    if settings is not None:
        ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Certified ({report.provenance.cert_method or '?'}) and empirical robust accuracy vs ε")
    return fig


def per_class_figure(report):
    """Grouped bars: per class, clean and certified accuracy of every section."""
    names = report.class_names
    per_class = report.per_class()
    fig = _figure(max(5.0, 1.0 + 0.9 * len(names) * max(1, len(per_class)) / 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(per_class))
    x = np.arange(len(names))
    for i, (section, rows) in enumerate(per_class.items()):
        colour = COLOURS.get(section, None)
        offset = (i - (len(per_class) - 1) / 2) * width
        ax.bar(x + offset, [100 * r["clean_accuracy"] for r in rows], width, color=colour, alpha=0.3,
               label=f"{section}: clean")
        ax.bar(x + offset, [100 * r["certified_accuracy"] for r in rows], width * 0.6, color=colour,
               label=f"{section}: certified")
    long = max((len(n) for n in names), default=0) * len(names) > 60
    ax.set_xticks(x, names, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Per-class accuracy at ε = {_cert_eps(report):g}")
    return fig


def history_figure(report):
    """Three panels per epoch: losses; accuracies; ε ramp and learning rate."""
    h = report.history
    epoch = np.asarray(h.get("epoch", np.arange(1, len(next(iter(h.values()))) + 1)), dtype=float)
    fig = _figure(11.0, 3.4)
    axes = fig.subplots(1, 3)
    for key, label in (("loss", "total"), ("ce_loss", "cross-entropy"), ("robust_loss", "robust")):
        if key in h:
            axes[0].plot(epoch, h[key], "o-", label=label)
    axes[0].set_ylabel("loss (batch mean)")
    axes[0].set_title("Training loss")
    for key, label, style in (("train_clean_accuracy", "train clean", "o-"),
                              ("train_certified_accuracy", "train certified (ramped ε)", "o--"),
                              ("val_clean_accuracy", "validation clean", "s-"),
                              ("val_certified_accuracy", "validation certified (target ε)", "s--")):
        if key in h and np.isfinite(h[key]).any():
            axes[1].plot(epoch, 100 * np.asarray(h[key]), style, label=label)
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_ylim(-2, 102)
    axes[1].set_title("Accuracy")
    if "eps" in h:
        axes[2].plot(epoch, h["eps"], "o-", color="tab:red", label="ε (end of epoch)")
        axes[2].set_ylabel("ε", color="tab:red")
        axes[2].set_ylim(bottom=0)
    if "lr" in h:
        twin = axes[2].twinx()
        twin.plot(epoch, h["lr"], "s:", color="tab:green", label="learning rate")
        twin.set_yscale("log")
        twin.set_ylabel("learning rate", color="tab:green")
    axes[2].set_title("ε ramp and learning rate")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def samples_figure(report, source: SampleSource, chosen: list[int]):
    """One row per sample: the clean image, then per section the worst field and the perturbed image."""
    import torch

    names = report.class_names
    sections = list(report.sections)
    cols = 1 + 2 * len(sections)
    fig = _figure(2.0 * cols, 2.2 * len(chosen) + 0.9, layout=None)  # constrained layout: 3x slower here
    grid = fig.subplots(len(chosen), cols, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.35 / fig.get_figheight(), bottom=0.9 / fig.get_figheight(),
                        wspace=0.08, hspace=0.45)
    positions = torch.as_tensor(chosen)
    clean = source.images[positions].float()
    labels = source.labels[positions]
    field_label = _field_label(source.perturbation)
    for j, section in enumerate(sections):
        certs = report.sections[section]
        rows = np.searchsorted(certs.index, chosen, sorter=np.argsort(certs.index))
        rows = np.argsort(certs.index)[rows]
        coeffs = torch.as_tensor(certs.attack_coeffs[rows], dtype=clean.dtype)
        aset = source.perturbation.affine_set(clean)
        perturbed = aset.clipped(aset.images(coeffs.unsqueeze(1))).squeeze(1)
        field = _field(source.perturbation, clean, coeffs)
        module = source.modules[section]
        with torch.no_grad():
            p_clean = torch.softmax(module(clean), -1)
            p_pert = torch.softmax(module(perturbed), -1)
        norm = _centred(field, source.perturbation)  # one scale per column: rows compare
        for i in range(len(chosen)):
            if j == 0:
                _show(grid[i, 0], clean[i])
                grid[i, 0].set_title(f"test #{chosen[i]}: {names[int(labels[i])]}", fontsize=8)
            clean_text = grid[i, 0].get_xlabel()
            grid[i, 0].set_xlabel((clean_text + "\n" if clean_text else "") + f"{section}: {_pred(names, p_clean[i])}",
                                  fontsize=7)
            ax = grid[i, 1 + 2 * j]
            image = ax.imshow(field[i].numpy(), cmap="coolwarm", norm=norm)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{section}: worst {field_label}", fontsize=8)
            ax = grid[i, 2 + 2 * j]
            _show(ax, perturbed[i])
            broken = int(p_pert[i].argmax()) != int(labels[i])
            ax.set_title(f"{section}: perturbed" + (" (broken)" if broken else ""), fontsize=8,
                         color="tab:red" if broken else "black")
            ax.set_xlabel(f"{_pred(names, p_pert[i])}; certified: {'yes' if certs.certified[rows[i]] else 'no'}",
                          fontsize=7)
        box = grid[-1, 1 + 2 * j].get_position()  # a bar under the column, in the bottom margin
        inch = 1 / fig.get_figheight()
        bar = fig.colorbar(image, cax=fig.add_axes((box.x0, 0.42 * inch, box.width, 0.1 * inch)),
                           orientation="horizontal")
        bar.set_label(f"{section}: {field_label} ({'1' if norm.vcenter == 1 else '0'} = no change)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def _field(perturbation, images, coeffs):
    """``[B, H, W]``: the bias field of ``coeffs`` (the gain of a multiplicative field, the offset of
    an additive one); for other perturbations the change of the first channel."""
    import torch

    from robnet_svc.perturbations.bias_field import BiasField

    if isinstance(perturbation, BiasField):
        probe = torch.ones_like(images[:, :1]) if perturbation.mode != "add" else torch.zeros_like(images[:, :1])
        aset = perturbation.affine_set(probe)
        field = aset.images(coeffs.unsqueeze(1)).squeeze(1)[:, 0]
        if perturbation.mode == "both":  # gain x 1 + offset: keep the gain only
            zero = perturbation.affine_set(torch.zeros_like(probe))
            field = field - zero.images(coeffs.unsqueeze(1)).squeeze(1)[:, 0]
        return field
    aset = perturbation.affine_set(images)
    return (aset.images(coeffs.unsqueeze(1)).squeeze(1) - images)[:, 0]


def _field_label(perturbation) -> str:
    from robnet_svc.perturbations.bias_field import BiasField

    if isinstance(perturbation, BiasField):
        return "gain field" if perturbation.mode != "add" else "additive field"
    return "change"


def _centred(values, perturbation):
    """Colour scale centred on the identity (gain 1, offset 0), symmetric."""
    from matplotlib.colors import CenteredNorm

    from robnet_svc.perturbations.bias_field import BiasField

    centre = 1.0 if isinstance(perturbation, BiasField) and perturbation.mode != "add" else 0.0
    return CenteredNorm(vcenter=centre, halfrange=max(float((values - centre).abs().max()), 1e-6))


def _show(ax, image) -> None:
    array = image.numpy()
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(array[:3].transpose(1, 2, 0), 0, 1))
    ax.set_xticks([]), ax.set_yticks([])


def _pred(names, probs) -> str:
    k = int(probs.argmax())
    return f"pred {names[k]} ({100 * float(probs[k]):.0f}%)"


# --------------------------------------------------------------------------- captions and HTML


def _curve_caption(report) -> str:
    settings = report.radius_settings
    if settings and all(c.radius is not None for c in report.sections.values()):
        return (f"Solid: share of test samples certified at ε (certified radius ≥ ε, bisection to "
                f"{settings['precision']:g} up to {settings['max']:g}). Dashed: share the attack did not break at ε "
                "(correct and smallest successful attack radius > ε), an upper estimate of the true robust accuracy.")
    return ("Clean accuracy (ε = 0) and certified / empirical robust accuracy at the certified ε only: "
            "run certify or harden with --radius for the whole curve.")


def _samples_caption(report, worst: bool, source: SampleSource) -> str:
    which = ("the correctly classified test samples with the smallest attack margin in the last section"
             if worst else "the chosen test samples")
    return (f"Rows: {which}. Per section: the worst field the attack found at ε = {_cert_eps(report):g} "
            f"(colour scale centred on no change) and the perturbed, clipped image with the model's prediction "
            f"(softmax probability). Re-computed from {source.origin}.")


def _html(report, figures, notes) -> str:
    e = html.escape
    prov = report.provenance.as_dict()
    rows = []
    for name, certs in report.sections.items():
        s = certs.summary()
        rows.append(f"<tr><td>{e(name)}</td><td>{s['num_samples']}</td>"
                    + "".join(f"<td>{100 * s[m]:.1f}%</td>" for m in ("clean_accuracy", "certified_accuracy",
                                                                        "empirical_robust_accuracy")) + "</tr>")
    radius_rows = []
    for name in report.sections:
        curve = report.radius_curve(name)
        if curve:
            radius_rows.append(f"<tr><td>{e(name)}</td>" + "".join(
                f"<td>{100 * c:.1f}</td>" for c in curve["certified_accuracy"]) + "</tr>")
            header = "".join(f"<th>{v:.3g}</th>" for v in curve["eps"])
    radius_table = (f"<h2>Certified accuracy (%) at ε</h2><table><tr><th>section</th>{header}</tr>"
                    + "".join(radius_rows) + "</table>") if radius_rows else ""
    shown = ("created_utc", "tool_version", "command_line", "input_model", "output_model", "dataset",
             "dataset_source", "perturbation_json", "train_method", "cert_method", "radius_json", "device")
    prov_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(prov[k]))}</td></tr>" for k in shown if prov.get(k))
    body = "".join(f"<figure><img alt=\"{e(name)}\" src=\"data:image/png;base64,{base64.b64encode(data).decode()}\">"
                   f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption, data in figures)
    note_html = "".join(f"<p class=\"note\">{e(n)}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>robnet-svc {e(report.kind)} report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555;font-size:0.9em}}.note{{color:#a50}}</style>
</head><body>
<h1>robnet-svc {e(report.kind)}: {e(str(prov.get('dataset', '')))}, certified with {e(str(prov.get('cert_method', '')))}</h1>
<p>Certificate format {e(report.format_version)}; perturbation {e(str(prov.get('perturbation_json', '')))}.</p>
<h2>Summary</h2>
<table><tr><th>section</th><th>n</th><th>clean</th><th>certified</th><th>empirical robust</th></tr>{''.join(rows)}</table>
{radius_table}
{note_html}
{body}
<h2>Provenance</h2><table>{prov_rows}</table>
</body></html>
"""
