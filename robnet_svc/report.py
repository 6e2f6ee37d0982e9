"""The HDF5 certificate (schema: ``docs/report-format.md``, version ``FORMAT_VERSION``):
write it atomically, read it back, and turn it into the summary and tables people read.

The module owns the schema: ``Provenance`` is the typed record of ``/provenance`` (encoded
to HDF5 attributes only by ``write_report``, decoded once by ``read_report``), ``Report``
the whole file. Layout (``S`` = a section: ``before``/``after`` for ``harden``, ``model``
for ``certify``)::

    /                      attrs: format_version, kind ("harden" | "certify")
    /provenance            attrs: one per ``Provenance`` field (``Provenance.encode`` names them)
    /summary               attrs: sections_json, and "<S>.<metric>" for every section and metric
    /certificates/<S>      attrs: the section's metrics, model, model_sha256, method;
                                  radius_eps, radius_certified_accuracy,
                                  radius_empirical_robust_accuracy (with --radius)
                           datasets: index, label, prediction, certified, margin_lower [N, K-1],
                                     attack_success, attack_margin, rounding_allowance [N, K-1],
                                     attack_coeffs [N, k]; radius, attack_radius (with --radius)
    /history               datasets, one value per epoch (harden only): see HISTORY_FIELDS
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robnet_svc.atomic import atomic_path
from robnet_svc.certificates import Certificates
from robnet_svc.errors import RobnetError

FORMAT_VERSION = "2"
#: Versions ``read_report`` accepts; format 1 had no rounding allowance (read back as zeros), no
#: optional per-sample datasets (``Certificates.OPTIONAL_FIELDS``) and no radius provenance.
READABLE_VERSIONS = ("1", "2")
#: Points of the certified-accuracy-vs-ε summary: this many equal steps from 0 to the radius maximum.
RADIUS_SUMMARY_STEPS = 10
METRICS = ("num_samples", "clean_accuracy", "certified_accuracy", "empirical_robust_accuracy")
HISTORY_FIELDS = ("epoch", "eps", "lr", "loss", "ce_loss", "robust_loss", "train_clean_accuracy",
                  "train_certified_accuracy", "val_clean_accuracy", "val_certified_accuracy", "seconds")


@dataclass
class Provenance:
    """Where a certificate comes from: the ``/provenance`` attributes, typed.

    Fields are stored under their own name, except the JSON ones, stored as a JSON string
    under ``<name>_json`` (``config``, ``class_names``, ``perturbation``, ``coeff_names``,
    ``attack``, ``radius``, ``selection``); None is stored as an empty string.
    ``docs/report-format.md`` says what each one means. ``unknown``: attributes of a newer
    file this version does not know, kept as read (and written back as they were).
    """

    tool: str = "robnet-svc"
    tool_version: str = ""
    torch_version: str = ""
    created_utc: str = ""
    command_line: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the effective config
    input_model: str = ""
    input_model_sha256: str = ""
    output_model: str | None = None  # harden only
    output_model_sha256: str | None = None
    dataset: str = ""
    dataset_source: str = ""
    class_names: list[str] = field(default_factory=list)
    image_shape: tuple[int, ...] = ()
    perturbation: dict[str, Any] = field(default_factory=dict)  # Perturbation.describe()
    coeff_names: list[str] = field(default_factory=list)
    coeff_lower: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [k]
    coeff_upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_method: str | None = None  # harden only
    cert_method: str = ""
    attack: dict[str, Any] | None = None  # AttackSettings: steps, restarts, seed
    device: str = ""
    bound_dtype: str = ""
    deployed_dtype: str = ""
    certified_rule: str = ""
    radius: dict[str, float] | None = None  # {"max", "precision"} of --radius
    selection: dict[str, Any] | None = None  # harden only: the exported epoch and why
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None
    unknown: dict[str, Any] = field(default_factory=dict)

    #: Fields stored as JSON under ``<name>_json``: whether their keys are sorted (else as given).
    JSON_FIELDS = {"config": True, "class_names": False, "perturbation": False, "coeff_names": False,
                   "attack": False, "radius": False, "selection": False}

    def encode(self) -> dict[str, Any]:
        """The HDF5 attributes (name -> str, number or numpy array)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "unknown":
                continue
            value = getattr(self, f.name)
            if f.name in self.JSON_FIELDS:
                out[f"{f.name}_json"] = self.json_text(f.name)
            elif f.name == "image_shape":
                out[f.name] = np.asarray([int(v) for v in value], dtype=np.int64)
            elif f.name in ("coeff_lower", "coeff_upper"):
                out[f.name] = np.asarray(value, dtype=np.float64)
            else:  # str subclasses (torch.__version__, numpy strings) as plain str: h5py stores those
                out[f.name] = "" if value is None else str(value) if isinstance(value, str) else value
        return {**out, **self.unknown}

    def json_text(self, name: str) -> str:
        """The stored text of JSON field ``name`` (attribute ``<name>_json``; empty for None)."""
        value = getattr(self, name)
        return "" if value is None else json.dumps(value, sort_keys=self.JSON_FIELDS[name])

    @classmethod
    def decode(cls, attrs: dict[str, Any]) -> "Provenance":
        """The record of ``/provenance`` attributes (as h5py reads them; older files may lack some)."""
        attrs = {key: _plain(value) for key, value in attrs.items()}
        known: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{f.name}_json" if f.name in cls.JSON_FIELDS else f.name
            if f.name == "unknown" or key not in attrs:
                continue
            value = attrs.pop(key)
            if f.name in cls.JSON_FIELDS:
                value = json.loads(value) if value != "" else (None if f.default is None else f.default_factory())
            elif f.name == "image_shape":
                value = tuple(int(v) for v in value)
            elif f.name in ("coeff_lower", "coeff_upper"):
                value = np.asarray(value, dtype=np.float64)
            elif value == "" and f.default is None:
                value = None
            known[f.name] = value
        return cls(**known, unknown=attrs)

    def as_dict(self) -> dict[str, Any]:
        """The attributes as plain JSON values, by name (``report show --json``)."""
        return {key: _plain(value) for key, value in sorted(self.encode().items())}


@dataclass
class Report:
    """A certificate as read back: everything in the file, as plain Python and numpy."""

    kind: str
    provenance: Provenance
    sections: dict[str, Certificates]
    section_attrs: dict[str, dict[str, Any]]
    history: dict[str, np.ndarray] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    @property
    def class_names(self) -> list[str]:
        return self.provenance.class_names

    @property
    def radius_settings(self) -> dict[str, float] | None:
        """``{"max", "precision"}`` of the radius search, or None (no ``--radius``, or format 1)."""
        return self.provenance.radius

    def radius_curve(self, section: str) -> dict[str, list[float]] | None:
        """Certified and empirical robust accuracy at ``RADIUS_SUMMARY_STEPS + 1`` equally spaced ε
        from 0 to the radius maximum (``Certificates.accuracy_at``), or None without radii."""
        certs, settings = self.sections[section], self.radius_settings
        if certs.radius is None or settings is None:
            return None
        return certs.accuracy_at(eps_grid(settings["max"], RADIUS_SUMMARY_STEPS))

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what ``summary.json`` and ``--json`` contain)."""
        prov = self.provenance
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "input_model": prov.input_model,
            "input_model_sha256": prov.input_model_sha256,
            "output_model": prov.output_model or None,
            "output_model_sha256": prov.output_model_sha256 or None,
            "dataset": prov.dataset,
            "perturbation": prov.perturbation,
            "train_method": prov.train_method or None,
            "cert_method": prov.cert_method,
            "sections": {name: {**certs.summary(), **({"radius": curve} if curve else {})}
                         for name, certs in self.sections.items() for curve in [self.radius_curve(name)]},
            "selection": prov.selection,
            "peak_rss_mib": prov.peak_rss_mib or None,  # None in older certificates
            "peak_gpu_mib": prov.peak_gpu_mib or None,
        }

    def per_class(self) -> dict[str, list[dict[str, Any]]]:
        """Per-class metrics of every section, with the class name in each row."""
        names = self.class_names
        out = {}
        for section, certs in self.sections.items():
            rows = certs.per_class(len(names))
            for row in rows:
                row["class"] = names[row["label"]]
            out[section] = rows
        return out


def eps_grid(top: float, steps: int) -> np.ndarray:
    """``steps + 1`` equally spaced ε from 0 to ``top``, as ``i * top / steps`` (so 0.3 is 0.3 exactly,
    not linspace's 0.30000000000000004, and a sample certified at ε = 0.3 counts there)."""
    return np.arange(steps + 1) * float(top) / steps


def write_report(path: str | Path, report: Report) -> Path:
    """Write ``report`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["kind"] = report.kind
            prov = f.create_group("provenance")
            for key, value in report.provenance.encode().items():
                prov.attrs[key] = value
            summary = f.create_group("summary")
            summary.attrs["sections_json"] = json.dumps(list(report.sections))
            certs_group = f.create_group("certificates")
            for name, certs in report.sections.items():
                group = certs_group.create_group(name)
                metrics = certs.summary()
                for key, value in {**report.section_attrs.get(name, {}), **metrics}.items():
                    group.attrs[key] = _attr(value)
                for key, value in metrics.items():
                    summary.attrs[f"{name}.{key}"] = value
                for key, values in (report.radius_curve(name) or {}).items():
                    group.attrs[f"radius_{key}"] = np.asarray(values, dtype=np.float64)
                for fname in Certificates.FIELDS + Certificates.OPTIONAL_FIELDS:
                    if getattr(certs, fname) is not None:
                        group.create_dataset(fname, data=getattr(certs, fname), compression="gzip", shuffle=True)
            if report.history:
                hist = f.create_group("history")
                for key, values in report.history.items():
                    hist.create_dataset(key, data=np.asarray(values, dtype=np.float64))
    return path


def _attr(value: Any) -> Any:
    """HDF5 attributes hold strings, numbers and numeric arrays; anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, (int, float, bool, np.ndarray, np.number, np.bool_)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value)
    return json.dumps(value)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_report(path: str | Path) -> Report:
    """Read a certificate; RobnetError when ``path`` is missing, not HDF5, or not a certificate
    of a format version this robnet-svc reads."""
    path = Path(path)
    if path.is_dir():
        raise RobnetError(f"certificate {path} is a folder; give the certificate.h5 file in it")
    if not path.is_file():
        raise RobnetError(f"certificate {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise RobnetError(f"{path} is not an HDF5 file (expected a certificate.h5 written by robnet-svc)") from None
    with f:
        version = _plain(f.attrs.get("format_version"))
        if version is None or "certificates" not in f:
            raise RobnetError(f"{path} is an HDF5 file but not a robnet-svc certificate (no format_version)")
        if str(version) not in READABLE_VERSIONS:
            raise RobnetError(f"{path} has certificate format {version}; this robnet-svc reads formats "
                              f"{', '.join(READABLE_VERSIONS)}: upgrade robnet-svc")
        try:
            provenance = Provenance.decode(dict(f["provenance"].attrs))
        except (ValueError, TypeError) as exc:
            raise RobnetError(f"{path}: its /provenance attributes cannot be read ({type(exc).__name__}: "
                              f"{exc}); is it a certificate written by robnet-svc?") from None
        order = json.loads(_plain(f["summary"].attrs["sections_json"]))
        sections, section_attrs = {}, {}
        for name in order:
            group = f["certificates"][name]
            fields = {fname: group[fname][()] for fname in Certificates.FIELDS + Certificates.OPTIONAL_FIELDS
                      if fname in group}
            fields.setdefault("rounding_allowance", np.zeros_like(fields["margin_lower"], dtype=np.float64))
            sections[name] = Certificates(**fields)
            section_attrs[name] = {k: _plain(v) for k, v in group.attrs.items()}
        history = {k: v[()] for k, v in f["history"].items()} if "history" in f else {}
        return Report(kind=_plain(f.attrs["kind"]), provenance=provenance, sections=sections,
                      section_attrs=section_attrs, history=history, format_version=str(version))


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    return path


def render(report: Report, console) -> None:
    """Print summary, provenance and the per-class table with rich on ``console``."""
    from rich.table import Table

    prov = report.provenance.as_dict()
    summary = Table(title=f"certificate ({report.kind}, format {report.format_version})", title_justify="left")
    summary.add_column("section")
    for metric in METRICS:
        summary.add_column(metric.replace("_", " "), justify="right")
    for name, certs in report.sections.items():
        s = certs.summary()
        summary.add_row(name, str(s["num_samples"]), *(f"{100 * s[m]:.1f}%" for m in METRICS[1:]))
    console.print(summary)
    curves = {name: report.radius_curve(name) for name in report.sections}
    if any(curves.values()):
        settings = report.radius_settings
        curves = {name: curve for name, curve in curves.items() if curve}
        radius = Table(title=f"certified / empirical robust accuracy at eps (radii to {settings['precision']:g})",
                       title_justify="left")
        radius.add_column("eps", justify="right")
        for name in curves:
            radius.add_column(name, justify="right")
        for i, eps in enumerate(next(iter(curves.values()))["eps"]):
            radius.add_row(f"{eps:.4g}", *(f"{100 * c['certified_accuracy'][i]:.1f}% / "
                                           f"{100 * c['empirical_robust_accuracy'][i]:.1f}%" for c in curves.values()))
        console.print(radius)

    shown = ("created_utc", "tool_version", "command_line", "input_model", "input_model_sha256", "output_model",
             "output_model_sha256", "dataset", "dataset_source", "image_shape", "perturbation_json",
             "train_method", "cert_method", "radius_json", "device", "peak_rss_mib", "peak_gpu_mib")
    table = Table(title="provenance", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key in shown:
        if prov.get(key) not in (None, ""):
            table.add_row(key, str(prov[key]))
    console.print(table)

    per_class = report.per_class()
    classes = Table(title="per class (clean / certified / empirical robust accuracy)", title_justify="left")
    classes.add_column("class")
    classes.add_column("n", justify="right")
    for name in per_class:
        classes.add_column(name, justify="right")
    for i, cls in enumerate(report.class_names):
        cells = [f"{100 * rows[i]['clean_accuracy']:.1f} / {100 * rows[i]['certified_accuracy']:.1f} / "
                 f"{100 * rows[i]['empirical_robust_accuracy']:.1f}" for rows in per_class.values()]
        n = next(iter(per_class.values()))[i]["num_samples"] if per_class else 0
        classes.add_row(cls, str(n), *cells)
    console.print(classes)
