"""The whole story, top to bottom: ``harden()`` and ``certify()``.

harden:  validate everything (nothing written) -> certify the input model ("before") ->
         robust fine-tuning (checkpoints at the start, per epoch and on a time interval; they
         keep "before", so --resume skips it) -> export ONNX (parity-checked) under a temporary
         name -> re-import the written file and certify it ("after") -> certificate.h5 +
         summary.json -> the model under its final name (never a model without its certificate)
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
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robnet_svc import __version__, threads
from robnet_svc.bounder import Bounder
from robnet_svc.bounds.alloc import release_free_memory
from robnet_svc.certify import (BOUND_DTYPE, CERTIFIED_RULE, AttackSettings, Certificates, RadiusSettings,
                                certify_model)
from robnet_svc.distributed import Dist
from robnet_svc.errors import RobnetError
from robnet_svc.options import SHORTHANDS, Options
from robnet_svc.perturbations.base import check_field_range
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.report import Provenance, Report, write_json, write_report
from robnet_svc.training import TrainData, TrainSettings, read_checkpoint, train

MODEL_FILE = "model.robust.onnx"
PARTIAL_MODEL_FILE = ".model.robust.onnx.uncertified"  # until its certificate is written
CERTIFICATE_FILE = "certificate.h5"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_FOLDER = "report"


@dataclass
class Plan:
    """Everything checked and loaded before any work starts."""

    options: Options
    imported: Any                 # onnx_io.ImportedModel (its module on ``device``)
    certifier: Bounder            # the input model, --cert-method, the perturbation at the target radius
    trainer: Bounder | None       # the same network with --method (ordered=False); None: certify only
    splits: Any                   # datasets.Splits
    test_index: np.ndarray        # positions in the dataset's test split that are certified
    device: torch.device
    out: Path | None
    data: TrainData | None = None
    dist: Dist = field(default_factory=Dist)
    resume_state: dict | None = None  # the checkpoint --resume continues from (rank 0; read in prepare)

    @property
    def perturbation(self):
        """The perturbation at the target radius."""
        return self.certifier.perturbation


# --------------------------------------------------------------------------- the two stories


def harden(options: Options, config: dict[str, Any], command_line: str, reporter: Reporter,
           dist: Dist | None = None) -> Report:
    """Fine-tune ``options.model`` to be certifiably robust and write the three outputs to ``options.out``.

    ``config``: the effective config (stored in the certificate); ``reporter``: where log
    lines, warnings and progress go (robnet_svc/progress.py);
    ``dist``: this process's place in a torchrun job (None: one process). Every rank returns
    the same report; only rank 0 writes.
    """
    plan = prepare(options, training=True, dist=dist, reporter=reporter)
    with _no_empty_folder(plan.out if plan.dist.is_main else None):
        return _harden(plan, config, command_line, reporter)


def _harden(plan: Plan, config: dict[str, Any], command_line: str, reporter: Reporter) -> Report:
    options = plan.options
    checkpoint = plan.out / CHECKPOINT_FILE
    if plan.dist.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        if checkpoint.exists() and not options.resume:
            checkpoint.unlink()  # --force: a stale checkpoint must not be resumed by accident later

    state = plan.dist.broadcast(plan.resume_state) if options.resume else None
    before_key = _before_key(plan)
    before = _certificates_from_state(state, "before", before_key)
    if before is None:
        reporter.log(f"certifying the input model on {len(plan.test_index)} test samples ({options.cert_method})")
        before = _certify(plan, plan.certifier, reporter, "before")
    else:
        reporter.log(f"before: kept from {checkpoint} "
                     f"(certified {100 * before.summary()['certified_accuracy']:.1f}%)")

    reporter.log(f"robust fine-tuning with {options.method} for {options.epochs} epoch(s) on {plan.device}"
           + (f" x {plan.dist.world_size} processes" if plan.dist.active else ""))
    history, selection = train(plan.trainer, plan.data, _train_settings(options),
                               checkpoint=checkpoint, resume=options.resume, fingerprint=_fingerprint(plan),
                               reporter=reporter, dist=plan.dist,
                               checkpoint_every=options.checkpoint_every,
                               phases={"before": _certificates_to_state(before, before_key)}, state=state)
    selected = selection_summary(selection.record(), plan.splits.class_names)
    reporter.log(f"selected epoch {selected['epoch']} (eps {selected['eps']:.4g}, validation clean "
           f"{_percent(selected['val_clean_accuracy'])}, certified {_percent(selected['val_certified_accuracy'])}): "
           f"{selected['reason']}")
    if plan.dist.is_main:
        for line in selection_warnings(selected, options.max_class_drop,
                                       max((row["eps"] for row in history), default=0.0),
                                       test_clean=before.summary()["clean_accuracy"]):
            reporter.warn(line)

    model_path = plan.out / MODEL_FILE
    partial_path = plan.out / PARTIAL_MODEL_FILE  # the final name only once the certificate is written
    try:
        robust = _export(plan, plan.trainer.module, partial_path, {
            "robnet_svc.perturbation": json.dumps(plan.perturbation.describe()),
            "robnet_svc.train_method": options.method})  # no config: it holds paths (it is in the certificate)
        robust.path = model_path  # what the certificate names: where the file ends up
        reporter.log(f"certifying the hardened model ({options.cert_method})")
        after = _certify(plan, plan.certifier.for_module(robust.module.to(plan.device)), reporter, "after")

        report = _report(plan, "harden", {"before": (before, plan.imported), "after": (after, robust)},
                         config, command_line, history, selected)
        if plan.dist.is_main:
            _write_outputs(plan.out, report)
            os.replace(partial_path, model_path)
    finally:
        if plan.dist.is_main:
            partial_path.unlink(missing_ok=True)
    if plan.dist.is_main and options.report_page:
        _write_page(plan, report, reporter)
    return report


def _write_page(plan: Plan, report: Report, reporter: Reporter) -> None:
    """Figures and report.html in ``--out/report`` (``robnet-svc report plot``). The model and the
    certificate are written already: a failure here is a warning, not a failed run."""
    from robnet_svc import report_plot

    folder = plan.out / REPORT_FOLDER
    try:
        source = report_plot.load_source(report, splits=plan.splits)
        page = report_plot.write_page(report, folder, source=source)
    except Exception as exc:  # noqa: BLE001 - the run's outputs stand; say how to draw them later
        reporter.warn(
            f"report page not written ({type(exc).__name__}: {exc}); "
            f"draw it with: robnet-svc report plot {plan.out / CERTIFICATE_FILE} --out {folder}")
        return
    reporter.log(f"wrote {page}")


def certify(options: Options, config: dict[str, Any], command_line: str, reporter: Reporter,
            dist: Dist | None = None) -> Report:
    """Certify ``options.model`` on the test split; write certificate + summary to ``options.out`` if given
    (rank 0 only; the test set is sharded over the ranks of a distributed run)."""
    plan = prepare(options, training=False, dist=dist, reporter=reporter)
    with _no_empty_folder(plan.out if plan.dist.is_main else None):
        return _certify_story(plan, config, command_line, reporter)


def _certify_story(plan: Plan, config: dict[str, Any], command_line: str, reporter: Reporter) -> Report:
    options = plan.options
    reporter.log(f"certifying {options.model} on {len(plan.test_index)} test samples ({options.cert_method})")
    certs = _certify(plan, plan.certifier, reporter, "model")
    report = _report(plan, "certify", {"model": (certs, plan.imported)}, config, command_line, [])
    if plan.out is not None and plan.dist.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        _write_outputs(plan.out, report)
    return report


# --------------------------------------------------------------------------- validation


def prepare(options: Options, training: bool, dist: Dist | None = None, reporter: Reporter = SILENT,
            check_only: bool = False) -> Plan | None:
    """Check every input and load model and data; RobnetError (one line) before anything is written.

    ``check_only``: stop (returning None) after every check that needs no data: the service's
    check of a submitted job (robnet_svc/service), the very checks of the command line.

    Distributed: every rank checks everything (so a bad input fails on every rank, before
    any collective) except ``--out``, which only rank 0 writes and checks; the process group
    is joined last. ``reporter``: where broken plugins are reported (rank 0), once every
    check has passed.
    """
    from robnet_svc.onnx_io import load_model
    from robnet_svc.plugins import load_registry

    dist = dist or Dist()
    out = _check_out(options, training) if dist.is_main else (Path(options.out) if options.out else None)
    registry = load_registry()
    perturbation = _perturbation(registry, options)
    cert_method = registry.bound_method(options.cert_method)()
    # Training needs sound bounds, not the cross-method ordering guarantees that cost extra
    # passes (robnet_svc/bounds/methods.py); certification keeps them.
    train_method = registry.bound_method(options.method)(ordered=False) if training else None
    dataset_cls = registry.dataset(options.dataset)
    if dataset_cls.needs_data_dir and not options.data_dir:
        raise RobnetError(f"dataset {options.dataset!r} needs --data-dir")
    if options.data_dir and not Path(options.data_dir).is_dir():
        raise RobnetError(f"--data-dir {options.data_dir} is not a folder")
    device = dist.device(_device(options.device))

    imported = load_model(options.model, image_shape=options.image_shape)
    _check_float32(imported, options.model)
    check_field_range(perturbation, imported.image_shape)
    if training and not any(p.requires_grad and p.numel() for p in imported.module.parameters()):
        raise RobnetError(f"model {options.model} has no weights robnet-svc can fine-tune (it trains the "
                          "weights of Gemm, Conv and BatchNormalization nodes; this model has none): nothing "
                          "to harden; `robnet-svc certify` still certifies it")
    for flag, method in (("--cert-method", cert_method), ("--method", train_method)):
        reason = method.check(perturbation, imported.image_shape) if method is not None else None
        if reason is not None:
            raise RobnetError(f"{flag} {method.name!r} {reason}: "
                              f"use {_fitting_methods(registry, perturbation, imported.image_shape)}")
    # The network is compiled now (unsupported operations are reported before any work), on the
    # device it is bounded on (a compiled copy would keep buffers moved later where they were);
    # the service's check leaves the model where it is.
    module = imported.module if check_only else imported.module.to(device)
    certifier = Bounder(module, cert_method, perturbation, imported.image_shape, rules=registry.rules())
    trainer = None
    if training:
        from robnet_svc.bounds.kernels import training_kernels

        kernels = training_kernels(device)  # the SSIP step on batch chunks on the CPU (bounds/kernels.py)
        shown = reporter if dist.is_main else SILENT
        if options.compile and not check_only and not train_method.needs_dense:
            shown.warn(f"--compile fuses the forward symbolic (SSIP) pass of ssip and rsip-ssip; --method "
                       f"{train_method.name} has none, so it trains as without --compile")
        elif options.compile and not check_only:
            from robnet_svc.bounds.kernels import check_compiled_kernels

            started = time.perf_counter()
            with shown.task("compiling the fused kernels (--compile)"):
                kernels = check_compiled_kernels(device)
            shown.log(f"--compile: fused kernels ready in {time.perf_counter() - started:.0f} s "
                      "(torch keeps them in its on-disk cache)")
        trainer = Bounder(certifier.net, train_method, perturbation, imported.image_shape, kernels=kernels)
    if device.type == "cpu" and not check_only and any(m is not None and m.needs_dense for m in (cert_method, train_method)):
        _native_kernels(reporter if dist.is_main else SILENT)
    radius = radius_settings(options)
    if radius is not None:
        from robnet_svc.certify import check_radius_support

        check_radius_support(perturbation, torch.rand(2, *imported.image_shape), radius)

    dataset = dataset_cls(options.data_dir, **options.dataset_options)
    if check_only:
        return None
    splits = dataset.load(imported.image_shape, reporter=reporter if dist.is_main else SILENT)
    _check_data(splits, imported, options)
    test_index = _subsample(splits.test_labels.shape[0], options.max_test)
    plan = Plan(options, imported, certifier, trainer, splits, test_index, device, out, dist=dist)
    if training:
        plan.data = _train_data(splits, options, device)
        if options.resume and dist.is_main:  # another run's checkpoint is refused now, not after "before"
            plan.resume_state = read_checkpoint(out / CHECKPOINT_FILE, _train_settings(options), _fingerprint(plan))
    if dist.is_main:  # after the checks: a failed check stays one line (it names broken plugins
        for line in registry.broken:  # itself when they matter)
            reporter.warn(line)
    dist.start(device)  # the first collective of the run comes after every check
    return plan


def _check_float32(imported, model: str) -> None:
    """Only float32 models: training, the exported file and the rounding allowance of the
    certificate (robnet_svc/rounding.py) are for a model that computes in float32."""
    dtypes = {str(imported.input_dtype), str(imported.output_dtype)}
    dtypes |= {str(p.dtype).removeprefix("torch.") for p in imported.module.parameters() if p.is_floating_point()}
    other = sorted(dtypes - {"float32"})
    if other:
        raise RobnetError(f"model {model} computes in {', '.join(other)}; robnet-svc hardens and certifies float32 "
                          "models (training, export and the certificate's rounding allowance assume float32): "
                          "export it in float32")

def radius_settings(options: Options) -> RadiusSettings | None:
    """The radius search of ``--radius`` (None without it): ``[0, --radius-max]`` (default 2 x eps)
    to ``--radius-precision`` (default a fiftieth of the maximum)."""
    if not options.radius:
        return None
    top = options.radius_max if options.radius_max is not None else 2 * options.eps
    precision = options.radius_precision if options.radius_precision is not None else top / 50
    if not (top > 0 and precision > 0):
        raise RobnetError(f"--radius-max ({top}) and --radius-precision ({precision}) must be > 0")
    if precision > top:
        raise RobnetError(f"--radius-precision {precision} is larger than --radius-max {top}")
    return RadiusSettings(max=float(top), precision=float(precision))


def _train_settings(options: Options) -> TrainSettings:
    return TrainSettings(eps=options.eps, epochs=options.epochs, ramp_epochs=options.ramp_epochs,
                         alpha=options.alpha, lr=options.lr, batch_size=options.batch_size, seed=options.seed,
                         max_clean_drop=options.max_clean_drop, ramp_shape=options.ramp_shape)


def selection_summary(record: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """``Selection.record()`` with the per-class validation accuracy keyed by class name:
    ``val_class_accuracy = {name: {"before": ..., "after": ...}}`` (None: no validation sample)."""
    before, after = record.pop("val_class_accuracy_before"), record.pop("val_class_accuracy_after")
    record["val_class_accuracy"] = {name: {"before": b, "after": a}
                                    for name, b, a in zip(class_names, before, after)}
    return record


#: Validation accuracy this far above test accuracy says the input model was trained on the validation split.
SEEN_VALIDATION_GAP = 0.03


def selection_warnings(selected: dict[str, Any], max_class_drop: float | None,
                       largest_eps: float, test_clean: float | None = None) -> list[str]:
    """The warning lines of a ``selection_summary``: the target radius not reached within the
    budget (with what usually helps), and every class whose validation accuracy fell more
    than ``max_class_drop`` (None: no per-class guard). ``largest_eps``: the largest radius
    training reached at all (below the target: the ramp never finished). ``test_clean``: the
    input model's test accuracy (the "before" section), to tell when its validation accuracy is
    that of data it was trained on, which makes the clean-accuracy budget a stricter test."""
    lines = []
    val_clean, budget = selected["input_val_clean_accuracy"], selected["max_clean_drop"]
    if budget is not None and test_clean is not None and val_clean is not None \
            and val_clean - test_clean > SEEN_VALIDATION_GAP:
        lines.append(f"the input model is {_percent(val_clean)} accurate on the validation split but "
                     f"{_percent(test_clean)} on the test split: it was probably trained on the validation "
                     "images, so --max-clean-drop compares accuracy on its own training data, which robust "
                     "training lowers more than accuracy on new data; train the input model without them "
                     "(harden holds out --val-fraction of the training split, seeded by --seed) or widen the "
                     "budget")
    if not selected["within_budget"]:
        budget = selected["max_clean_drop"]
        if largest_eps < selected["target_eps"]:
            helps = (f"training itself stopped at eps {largest_eps:.4g}: give more --epochs than --ramp-epochs "
                     "(the radius grows to --eps over the ramp)")
        else:
            helps = ("what usually helps: more --epochs, a longer --ramp-epochs, a smaller --alpha or --lr, or a "
                     "warm-up run with --method rsip-ibp whose output is hardened again")
        lines.append(
            f"no epoch reached the target eps {selected['target_eps']:g}"
            + ("" if budget is None else f" within the clean-accuracy budget (--max-clean-drop {budget:g} "
               f"below the input model's validation accuracy {_percent(selected['input_val_clean_accuracy'])})")
            + f"; exported epoch {selected['epoch']}, which reached eps {selected['eps']:.4g}; {helps}")
    for name, acc in selected["val_class_accuracy"].items():
        if max_class_drop is not None and acc["before"] is not None and acc["after"] is not None \
                and acc["after"] < acc["before"] - max_class_drop - 1e-9:
            lines.append(f"class {name!r}: validation accuracy fell from {_percent(acc['before'])} to "
                         f"{_percent(acc['after'])} (more than --max-class-drop {max_class_drop:g})")
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


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


def _native_kernels(reporter: Reporter) -> None:
    """Build or load the native CPU kernels of the SSIP pass now, before any work
    (robnet_svc/bounds/native.py): the first run on a machine says it builds them (about 30 s),
    and a machine where they cannot be built gets one warning; its bounds are the same."""
    from robnet_svc.bounds import native

    if native.enabled() and native.kernels(report=reporter.log) is None:
        reporter.warn(f"native CPU kernels of the SSIP step: {native.status()}; the bounds are the same, the "
                      "SSIP passes outside training slower")


def _fitting_methods(registry, perturbation, image_shape) -> str:
    """The registered bound methods whose contract check accepts ``perturbation`` ("a, b or c")."""
    names = [name for name, entry in registry.bound_methods.items()
             if entry.obj().check(perturbation, image_shape) is None]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names) or "none"


def _perturbation(registry, options: Options):
    return registry.perturbation(options.perturbation)(options.eps, **options.perturbation_settings())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RobnetError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RobnetError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


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


def validation_split(num_train: int, val_fraction: float, seed: int,
                     max_train: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(validation, training)`` positions into a training split of ``num_train`` samples, as
    ``harden`` draws them (seeded subsample ``--max-train``, then ``--val-fraction`` held out).
    Train an input model on the second part only and the validation split stays unseen data,
    which is what the clean-accuracy budget assumes."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    if max_train is not None:
        order = order[:max_train]
    num_val = int(round(val_fraction * order.shape[0]))
    if order.shape[0] - num_val < 1:
        raise RobnetError(f"--val-fraction {val_fraction} leaves no training samples")
    return order[:num_val], order[num_val:]


def _train_data(splits, options: Options, device: torch.device) -> TrainData:
    """Seeded subsample (``--max-train``) and held-out validation split (``--val-fraction``)."""
    val, tr = validation_split(splits.train_labels.shape[0], options.val_fraction, options.seed, options.max_train)
    images, labels = splits.train_images.to(device), splits.train_labels.to(device)
    data = TrainData(images[tr.to(device)], labels[tr.to(device)], images[val.to(device)], labels[val.to(device)],
                     num_classes=splits.num_classes)
    # TrainData holds its own copy: drop the split's, so the run holds the training images once
    # (at 3x224x224 that is gigabytes, more than any bound computation of a batch).
    splits.train_images = splits.train_images[:0]
    return data


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


def _certify(plan: Plan, bounder: Bounder, reporter: Reporter, label: str) -> Certificates:
    """Certificates of ``bounder``'s model on the test samples ``plan.test_index``, in that order.

    Distributed: each rank certifies a contiguous share and the shares are gathered in rank
    order; attacks are seeded per sample (its position in the test split), not per rank."""
    o = plan.options
    mine = plan.test_index[plan.dist.shard(len(plan.test_index))]
    index = torch.from_numpy(mine)
    if mine.size and np.array_equal(mine, np.arange(mine[0], mine[0] + mine.size)):  # a view, not a copy
        images, labels = (t[int(mine[0]):int(mine[0]) + mine.size] for t in (plan.splits.test_images,
                                                                               plan.splits.test_labels))
    else:
        images, labels = plan.splits.test_images[index], plan.splits.test_labels[index]
    certs = certify_model(
        bounder, images, labels,
        batch_size=o.cert_batch_size, device=plan.device, sample_ids=index, radius=radius_settings(o),
        attack=AttackSettings(steps=o.attack_steps, restarts=o.attack_restarts, seed=o.seed),
        reporter=reporter, description=f"certify {label}",
    )
    certs = Certificates.concat(plan.dist.gather(certs))
    release_free_memory()  # the bound passes' free heap goes back before the next phase (bounds/alloc.py)
    s = certs.summary()
    reporter.log(f"{label}: clean {100 * s['clean_accuracy']:.1f}%  certified {100 * s['certified_accuracy']:.1f}%  "
           f"empirical robust {100 * s['empirical_robust_accuracy']:.1f}%  (n={s['num_samples']})")
    if certs.radius is not None and certs.num_samples:
        reporter.log(f"{label}: median certified radius {float(np.median(certs.radius)):.4g} (of correct samples: "
               f"{float(np.median(certs.radius[certs.prediction == certs.label])) if s['clean_accuracy'] else 0:.4g})")
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
            command_line: str, history: list[dict[str, float]], selection: dict[str, Any] | None = None) -> Report:
    o = plan.options
    probe = plan.perturbation.affine_set(plan.splits.test_images[:1])
    image_shape = tuple(plan.imported.image_shape)
    output = sections.get("after", (None, None))[1]
    provenance = Provenance(
        tool_version=__version__,
        torch_version=torch.__version__,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command_line=command_line,
        config=_resolved_config(plan, config),
        input_model=str(plan.imported.path),
        input_model_sha256=plan.imported.sha256,
        output_model=str(output.path) if output is not None else None,
        output_model_sha256=output.sha256 if output is not None else None,
        dataset=o.dataset,
        dataset_source=plan.splits.source,
        class_names=list(plan.splits.class_names),
        image_shape=image_shape,
        perturbation=plan.perturbation.describe(),
        coeff_names=plan.perturbation.coeff_names(image_shape),
        coeff_lower=probe.lower[0].double().numpy(),
        coeff_upper=probe.upper[0].double().numpy(),
        train_method=o.method if kind == "harden" else None,
        cert_method=o.cert_method,
        attack=asdict(AttackSettings(o.attack_steps, o.attack_restarts, o.seed)),
        device=str(plan.device),
        bound_dtype=str(BOUND_DTYPE).removeprefix("torch."),
        deployed_dtype=str(plan.imported.input_dtype),
        certified_rule=CERTIFIED_RULE,
        radius=asdict(radius_settings(o)) if o.radius else None,
        selection=selection,
        **peak_memory(),
    )
    section_attrs = {name: {"model": str(model.path), "model_sha256": model.sha256, "method": o.cert_method}
                     for name, (_certs, model) in sections.items()}
    hist = {key: np.array([row[key] for row in history], dtype=np.float64) for key in (history[0] if history else {})}
    return Report(kind=kind, provenance=provenance, sections={n: c for n, (c, _m) in sections.items()},
                  section_attrs=section_attrs, history=hist)


@contextmanager
def _no_empty_folder(out: Path | None) -> Iterator[None]:
    """On failure (error, interrupt), remove ``out`` if this run created it and left it empty."""
    existed = out is None or out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _before_key(plan: Plan) -> str:
    """What the "before" certification depends on: a checkpoint's copy is reused only if it matches."""
    o = plan.options
    parts = [plan.imported.sha256, o.dataset, str(o.data_dir), json.dumps(o.dataset_options, sort_keys=True,
                                                                          default=str),
             str(o.image_shape), json.dumps(plan.test_index.tolist()),
             json.dumps(plan.perturbation.describe(), sort_keys=True), o.cert_method, str(o.cert_batch_size),
             json.dumps(asdict(AttackSettings(o.attack_steps, o.attack_restarts, o.seed))), str(plan.device)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _certificates_to_state(certs: Certificates, key: str) -> dict[str, Any]:
    """``certs`` as plain tensors (what ``torch.load(weights_only=True)`` reads back), with ``key``."""
    return {"key": key, **{f: torch.from_numpy(np.ascontiguousarray(getattr(certs, f))) for f in Certificates.FIELDS}}


def _certificates_from_state(state: dict | None, phase: str, key: str) -> Certificates | None:
    """The certificates of ``phase`` kept in a checkpoint ``state``, if they were made with ``key``."""
    kept = (state or {}).get("phases", {}).get(phase)
    if not kept or kept.get("key") != key:
        return None
    return Certificates(*(kept[f].numpy() for f in Certificates.FIELDS))


def _resolved_config(plan: Plan, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the values the run used where the command line left a default to be
    decided (``None``): perturbation options, ramp, sample counts, threads, device; plus the
    plugin options the run used, every declared one (``perturbation_options``, ``dataset_options``)."""
    from robnet_svc.plugin_options import resolve
    from robnet_svc.plugins import load_registry

    o = plan.options
    described = {k: v for k, v in plan.perturbation.describe().items() if k not in ("name", "eps", "clip")}
    used = {**{k: v for k, v in described.items() if k in ("order", "mode")},
            "coef_scale": getattr(plan.perturbation, "effective_coef_scale", None),
            "max_test": len(plan.test_index), "threads": o.threads or threads.current()}
    if plan.data is not None:  # harden
        used["ramp_epochs"] = _train_settings(o).ramp
        used["max_train"] = int(plan.data.images.shape[0] + plan.data.val_images.shape[0])
    resolved = {key: used[key] if value is None and key in used else value for key, value in config.items()}
    for key in SHORTHANDS:  # a flag's text ("2") is recorded as the value used (2)
        if resolved.get(key) is not None and key in used:
            resolved[key] = used[key]
    if resolved.get("device") == "auto":
        resolved["device"] = str(plan.device)
    resolved["perturbation_options"] = described
    resolved["dataset_options"] = resolve("dataset", o.dataset, load_registry().dataset(o.dataset).options,
                                          o.dataset_options)
    return resolved


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak tensor memory (MiB)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB elsewhere
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return {"peak_rss_mib": round(rss_mib, 1), "peak_gpu_mib": round(gpu, 1) if gpu is not None else None}


def _write_outputs(out: Path, report: Report) -> None:
    """The certificate and the summary (rank 0's job)."""
    write_report(out / CERTIFICATE_FILE, report)
    write_json(out / SUMMARY_FILE, report.summary())
