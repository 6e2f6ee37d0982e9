"""The whole story, top to bottom: ``harden()`` and ``certify()``.

harden:  validate everything (nothing written) -> certify the input model ("before") ->
         robust fine-tuning (checkpoint per epoch) -> export ONNX (parity-checked) ->
         re-import the written file and certify it ("after") -> certificate.h5 + summary.json
certify: validate -> certify the model ("model") -> optionally certificate.h5 + summary.json

The "after" certificate is computed on the exported file as re-imported, exactly what
``robnet-svc certify model.robust.onnx`` computes, so that command reproduces its flags.

Distributed (``torchrun``, docs/distributed.md): every rank runs this same story with its
``Dist``. Each validates everything itself (only rank 0 checks ``--out``, which only it
writes) before the first collective; certification is sharded and gathered back in the
original order; training is DistributedDataParallel; rank 0 exports the ONNX file and sends
its bytes to the others, so every rank certifies the very file that is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robnet_svc import __version__
from robnet_svc.certify import AttackSettings, Certificates, certify_model
from robnet_svc.distributed import Dist
from robnet_svc.errors import RobnetError
from robnet_svc.options import Options
from robnet_svc.report import Report, write_json, write_report
from robnet_svc.training import TrainData, TrainSettings, read_checkpoint, train

MODEL_FILE = "model.robust.onnx"
CERTIFICATE_FILE = "certificate.h5"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Plan:
    """Everything checked and loaded before any work starts."""

    options: Options
    imported: Any                 # onnx_io.ImportedModel
    perturbation: Any             # Perturbation at the target radius
    cert_method: Any
    train_method: Any | None
    rules: dict
    splits: Any                   # datasets.Splits
    test_index: np.ndarray        # positions in the dataset's test split that are certified
    device: torch.device
    out: Path | None
    data: TrainData | None = None
    dist: Dist = field(default_factory=Dist)


# --------------------------------------------------------------------------- the two stories


def harden(options: Options, config: dict[str, Any], command_line: str, ui, dist: Dist | None = None) -> Report:
    """Fine-tune ``options.model`` to be certifiably robust and write the three outputs to ``options.out``.

    ``config``: the effective config (stored in the certificate); ``ui``: progress and log
    sink (``robnet_svc.cli.Ui``-like: ``.progress``, ``.log(msg)``, optional ``.warn(msg)``);
    ``dist``: this process's place in a torchrun job (None: one process). Every rank returns
    the same report; only rank 0 writes.
    """
    plan = prepare(options, training=True, dist=dist, warn=getattr(ui, "warn", None))
    checkpoint = plan.out / CHECKPOINT_FILE
    if plan.dist.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        if checkpoint.exists() and not options.resume:
            checkpoint.unlink()  # --force: a stale checkpoint must not be resumed by accident later

    ui.log(f"certifying the input model on {len(plan.test_index)} test samples ({options.cert_method})")
    module = plan.imported.module.to(plan.device)
    before = _certify(plan, module, ui, "before")

    ui.log(f"robust fine-tuning with {options.method} for {options.epochs} epoch(s) on {plan.device}"
           + (f" x {plan.dist.world_size} processes" if plan.dist.active else ""))
    net = _compile(module, plan.rules)
    history = train(module, net, plan.train_method, plan.perturbation, plan.data, _train_settings(options),
                    checkpoint=checkpoint, resume=options.resume, fingerprint=_fingerprint(plan),
                    progress=ui.progress, log=ui.log, dist=plan.dist)

    model_path = plan.out / MODEL_FILE
    robust = _export(plan, module, model_path, {
        "robnet_svc.perturbation": json.dumps(plan.perturbation.describe()),
        "robnet_svc.train_method": options.method})  # no config: it holds paths (it is in the certificate)
    ui.log(f"certifying the hardened model {model_path} ({options.cert_method})")
    after = _certify(plan, robust.module.to(plan.device), ui, "after")

    report = _report(plan, "harden", {"before": (before, plan.imported), "after": (after, robust)},
                     config, command_line, history)
    if plan.dist.is_main:
        _write_outputs(plan.out, report)
    return report


def certify(options: Options, config: dict[str, Any], command_line: str, ui, dist: Dist | None = None) -> Report:
    """Certify ``options.model`` on the test split; write certificate + summary to ``options.out`` if given
    (rank 0 only; the test set is sharded over the ranks of a distributed run)."""
    plan = prepare(options, training=False, dist=dist, warn=getattr(ui, "warn", None))
    ui.log(f"certifying {options.model} on {len(plan.test_index)} test samples ({options.cert_method})")
    certs = _certify(plan, plan.imported.module.to(plan.device), ui, "model")
    report = _report(plan, "certify", {"model": (certs, plan.imported)}, config, command_line, [])
    if plan.out is not None and plan.dist.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        _write_outputs(plan.out, report)
    return report


# --------------------------------------------------------------------------- validation


def prepare(options: Options, training: bool, dist: Dist | None = None, warn=None) -> Plan:
    """Check every input and load model and data; RobnetError (one line) before anything is written.

    Distributed: every rank checks everything (so a bad input fails on every rank, before
    any collective) except ``--out``, which only rank 0 writes and checks; the process group
    is joined last. ``warn(line)``: where broken plugins are reported (rank 0), once every
    check has passed.
    """
    from robnet_svc.onnx_io import load_model
    from robnet_svc.plugins import load_registry

    dist = dist or Dist()
    out = _check_out(options, training) if dist.is_main else (Path(options.out) if options.out else None)
    registry = load_registry()
    perturbation = _perturbation(registry, options)
    cert_method = registry.bound_method(options.cert_method)()
    train_method = registry.bound_method(options.method)() if training else None
    if train_method is not None:
        # Training needs sound bounds, not the cross-method ordering guarantees that cost
        # extra passes (robnet_svc/bounds/methods.py); certification keeps them.
        train_method.ordered = False
    dataset_cls = registry.dataset(options.dataset)
    if dataset_cls.needs_data_dir and not options.data_dir:
        raise RobnetError(f"dataset {options.dataset!r} needs --data-dir")
    if options.data_dir and not Path(options.data_dir).is_dir():
        raise RobnetError(f"--data-dir {options.data_dir} is not a folder")
    device = dist.device(_device(options.device))

    imported = load_model(options.model, image_shape=options.image_shape)
    probe = torch.zeros(1, *imported.image_shape)
    for flag, method in (("--cert-method", cert_method), ("--method", train_method)):
        if method is None:
            continue
        if getattr(method, "needs_dense", False) and not perturbation.affine_set(probe).supports_dense:
            raise RobnetError(f"{flag} {method.name!r} needs a small number of perturbation coefficients; "
                              f"perturbation {options.perturbation!r} has "
                              f"{perturbation.num_coeffs(imported.image_shape)}: use ibp, rsip-ibp or rsip")
    rules = registry.rules()
    _compile(imported.module, rules)  # unsupported operations are reported now, not after training

    dataset = dataset_cls(options.data_dir, **options.dataset_options)
    splits = dataset.load(imported.image_shape, progress=dist.is_main)
    _check_data(splits, imported, options)
    test_index = _subsample(splits.test_labels.shape[0], options.max_test)
    plan = Plan(options, imported, perturbation, cert_method, train_method, rules, splits, test_index, device, out,
                dist=dist)
    if training:
        plan.data = _train_data(splits, options, device)
        if options.resume and dist.is_main:  # another run's checkpoint is refused now, not after "before"
            read_checkpoint(out / CHECKPOINT_FILE, _train_settings(options), _fingerprint(plan))
    if warn is not None and dist.is_main:  # after the checks: a failed check stays one line (it names
        for line in registry.broken:       # broken plugins itself when they matter)
            warn(line)
    dist.start(device)  # the first collective of the run comes after every check
    return plan


def _train_settings(options: Options) -> TrainSettings:
    return TrainSettings(eps=options.eps, epochs=options.epochs, ramp_epochs=options.ramp_epochs,
                         alpha=options.alpha, lr=options.lr, batch_size=options.batch_size, seed=options.seed)


def _check_out(options: Options, training: bool) -> Path | None:
    if options.out is None:
        if training:
            raise RobnetError("give --out DIR: the folder for model.robust.onnx, certificate.h5 and summary.json")
        return None
    out = Path(options.out)
    if options.resume and options.force:  # which one wins would be a guess: refuse it
        raise RobnetError("--resume and --force exclude each other: --resume continues the run in --out, "
                          "--force starts it over")
    if out.exists() and not out.is_dir():
        raise RobnetError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not options.force:
        if not (training and options.resume and (out / CHECKPOINT_FILE).exists()):
            raise RobnetError(f"--out {out} exists and is not empty; use --force to overwrite"
                              + (" or --resume to continue its run" if training else ""))
    if options.resume and not (out / CHECKPOINT_FILE).exists():
        raise RobnetError(f"--resume: there is no {CHECKPOINT_FILE} in {out} to resume from")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RobnetError(f"--out {out}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RobnetError(f"--out {out}: cannot write in {existing} (permission denied)")
    return out


def _perturbation(registry, options: Options):
    cls = registry.perturbation(options.perturbation)
    given = {"order": options.order, "mode": options.mode, "coef_scale": options.coef_scale}
    return cls(options.eps, **{k: v for k, v in given.items() if v is not None})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RobnetError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RobnetError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


def _compile(module, rules):
    from robnet_svc.bounds import compile_network

    return compile_network(module, rules=rules)


def _check_data(splits, imported, options: Options) -> None:
    where = f"dataset {options.dataset!r}" + (f" in {options.data_dir}" if options.data_dir else "")
    if splits.num_classes != imported.num_classes:
        raise RobnetError(f"{where} has {splits.num_classes} classes but model {options.model} outputs "
                          f"{imported.num_classes}; use a model trained on this dataset")
    for name, images in (("training", splits.train_images), ("test", splits.test_images)):
        if tuple(images.shape[1:]) != tuple(imported.image_shape):
            raise RobnetError(f"{where}: {name} images have shape {tuple(images.shape[1:])} but model "
                              f"{options.model} expects {tuple(imported.image_shape)} (C, H, W)")
        if images.shape[0] == 0:
            raise RobnetError(f"{where} has no {name} images")


def _subsample(num: int, limit: int | None) -> np.ndarray:
    """Evenly spaced positions (covers every class of a class-sorted split; independent of the seed)."""
    if limit is None or limit >= num:
        return np.arange(num, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * num) // limit


def _train_data(splits, options: Options, device: torch.device) -> TrainData:
    """Seeded subsample (``--max-train``) and held-out validation split (``--val-fraction``)."""
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(splits.train_labels.shape[0], generator=generator)
    if options.max_train is not None:
        order = order[: options.max_train]
    num_val = int(round(options.val_fraction * order.shape[0]))
    if order.shape[0] - num_val < 1:
        raise RobnetError(f"--val-fraction {options.val_fraction} leaves no training samples")
    val, tr = order[:num_val], order[num_val:]
    images, labels = splits.train_images.to(device), splits.train_labels.to(device)
    return TrainData(images[tr.to(device)], labels[tr.to(device)], images[val.to(device)], labels[val.to(device)])


def _fingerprint(plan: Plan) -> str:
    """What a checkpoint must agree on besides the training settings: model, data, perturbation, method."""
    o = plan.options
    parts = [plan.imported.sha256, o.dataset, str(o.data_dir), json.dumps(o.dataset_options, sort_keys=True,
                                                                          default=str),
             str(o.image_shape), str(o.max_train),
             str(o.val_fraction), json.dumps(plan.perturbation.describe(), sort_keys=True), o.method,
             str(plan.data.images.shape[0])]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------- certification and outputs


def _certify(plan: Plan, module, ui, label: str) -> Certificates:
    """Certificates of ``module`` on the test samples ``plan.test_index``, in that order.

    Distributed: each rank certifies a contiguous share and the shares are gathered in rank
    order; attacks are seeded per sample (its position in the test split), not per rank."""
    o = plan.options
    mine = plan.test_index[plan.dist.shard(len(plan.test_index))]
    index = torch.from_numpy(mine)
    images, labels = plan.splits.test_images[index], plan.splits.test_labels[index]
    net = _compile(module, plan.rules)
    task = ui.progress.add_task(f"certify {label}", total=images.shape[0], stats="") if ui.progress else None
    certs = certify_model(
        module, net, plan.cert_method, plan.perturbation, images, labels,
        batch_size=o.cert_batch_size, device=plan.device, sample_ids=index,
        attack=AttackSettings(steps=o.attack_steps, restarts=o.attack_restarts, seed=o.seed),
        on_batch=(lambda n: ui.progress.update(task, advance=n)) if task is not None else None,
    )
    if task is not None:
        ui.progress.remove_task(task)
    certs = Certificates.concat(plan.dist.gather(certs))
    s = certs.summary()
    ui.log(f"{label}: clean {100 * s['clean_accuracy']:.1f}%  certified {100 * s['certified_accuracy']:.1f}%  "
           f"empirical robust {100 * s['empirical_robust_accuracy']:.1f}%  (n={s['num_samples']})")
    return certs


def _export(plan: Plan, module, model_path: Path, metadata: dict[str, str]):
    """Rank 0 writes ``module`` as ONNX at ``model_path``; every rank returns the written file re-imported
    (other ranks receive its bytes: no shared file system needed)."""
    import tempfile

    from robnet_svc.onnx_io import export_model, load_model

    if plan.dist.is_main:
        export_model(module, source=plan.imported, out_path=model_path,
                     metadata=metadata)
    data = plan.dist.broadcast(model_path.read_bytes() if plan.dist.is_main and plan.dist.active else None)
    if plan.dist.is_main:
        return load_model(model_path, image_shape=plan.options.image_shape)
    with tempfile.TemporaryDirectory() as tmp:
        copy_path = Path(tmp) / MODEL_FILE
        copy_path.write_bytes(data)
        return load_model(copy_path, image_shape=plan.options.image_shape)


def _report(plan: Plan, kind: str, sections: dict[str, tuple[Certificates, Any]], config: dict[str, Any],
            command_line: str, history: list[dict[str, float]]) -> Report:
    o = plan.options
    probe = plan.perturbation.affine_set(plan.splits.test_images[:1])
    image_shape = tuple(plan.imported.image_shape)
    output = sections.get("after", (None, None))[1]
    provenance = {
        "tool": "robnet-svc",
        "tool_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line,
        "config_json": json.dumps(config, sort_keys=True),
        "input_model": str(plan.imported.path),
        "input_model_sha256": plan.imported.sha256,
        "output_model": str(output.path) if output is not None else "",
        "output_model_sha256": output.sha256 if output is not None else "",
        "dataset": o.dataset,
        "dataset_source": plan.splits.source,
        "class_names_json": json.dumps(list(plan.splits.class_names)),
        "image_shape": list(image_shape),
        "perturbation_json": json.dumps(plan.perturbation.describe()),
        "coeff_names_json": json.dumps(plan.perturbation.coeff_names(image_shape)),
        "coeff_lower": probe.lower[0].double().numpy(),
        "coeff_upper": probe.upper[0].double().numpy(),
        "train_method": o.method if kind == "harden" else "",
        "cert_method": o.cert_method,
        "attack_json": json.dumps(asdict(AttackSettings(o.attack_steps, o.attack_restarts, o.seed))),
        "device": str(plan.device),
    }
    section_attrs = {name: {"model": str(model.path), "model_sha256": model.sha256, "method": o.cert_method}
                     for name, (_certs, model) in sections.items()}
    hist = {key: np.array([row[key] for row in history], dtype=np.float64) for key in (history[0] if history else {})}
    return Report(kind=kind, provenance=provenance, sections={n: c for n, (c, _m) in sections.items()},
                  section_attrs=section_attrs, history=hist)


def _write_outputs(out: Path, report: Report) -> None:
    """The certificate and the summary (rank 0's job)."""
    write_report(out / CERTIFICATE_FILE, report)
    write_json(out / SUMMARY_FILE, report.summary())
