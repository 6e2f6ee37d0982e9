"""``robnet-svc export-vnnlib``: a certificate as VNN-COMP instances anyone can re-check.

For each selected test sample ``x`` of a certificate section, the folder gets

- ``onnx/sample_<i>.onnx``: a network whose input ``[1, k]`` is the perturbation's coefficient
  vector ``a``: the transform layer of that sample (``Gemm``: ``W_x a + c_x``; ``Add`` for
  ``W = I`` perturbations such as ``linf``), the clipping layer in ReLU form (the same
  ``hi - ReLU((hi-lo) - ReLU(z - lo))`` the bound engine uses: ``Relu`` and ``Sub``; ``lo`` is
  folded into the Gemm bias), a ``Reshape`` to the model's input, then the user's ONNX graph
  unchanged (a trailing Softmax/LogSoftmax removed: the outputs are logits). The opset is the
  user's model's; the added ops exist since opset 7 (earlier models are converted);
- ``vnnlib/prop_<i>.vnnlib``: the coefficient box and the unsafe disjunction "some other class
  ``Y_j >= Y_label``" (``robnet_svc.vnnlib``);
- ``instances.csv`` (``onnx,vnnlib,timeout``, no header, like VNN-COMP benchmarks),
  ``export.json`` (what was exported and every check's numbers) and ``README.md``.

``<i>`` is the sample's position in the dataset's test split (the certificate's ``index``).
Settings (dataset, image shape, perturbation with eps, options and clip range, bound method)
come from the certificate's provenance; the model must be the file of one of its sections
(matched by sha256).

Checks, per sample, before the folder appears (written to a temporary folder, then renamed):

1. onnxruntime on the exported network at the nominal coefficients equals the user's model
   (onnxruntime, original file) on the clean image;
2. at random coefficient vectors in the box (random corners among them) it equals the user's
   model on the perturbed, clipped image;
3. robnet-svc's engine re-certifies the exported files (``vnnlib_verify``: input box from the
   written VNN-LIB file, identity map) with the certificate's method and reaches the
   certificate's verdict.

A failed check is an ``ExportCheckError`` (exit 3: a bug, nothing written).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from robnet_svc.atomic import atomic_folder
from robnet_svc.certify import AttackSettings
from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import parse_pairs
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.vnnlib import property_text

#: Coefficient vectors checked per sample besides the nominal one.
RANDOM_CHECKS = 8
#: Samples whose affine sets and reference outputs are built at once (bounds memory).
CHUNK = 64
#: onnxruntime agreement: |exported - model| <= ATOL + RTOL * |model| on every logit.
ATOL, RTOL = 1e-4, 1e-4
INPUT_NAME = "coefficients"
MIN_OPSET = 7


class ExportCheckError(RobnetError):
    """An exported instance disagrees with the model or the certificate: a bug (exit 3)."""

    exit_code = 3


@dataclass
class Sources:
    """Everything an export reads, checked."""

    report: object            # report.Report
    section: str
    imported: object          # onnx_io.ImportedModel
    source: onnx.ModelProto   # the user's ONNX file as read
    perturbation: object
    cert_method: str
    images: torch.Tensor      # [N, C, H, W] of the selected rows
    rows: np.ndarray          # selected rows of the section


# --------------------------------------------------------------------------- inputs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dataset_options(config: dict) -> dict:
    """The dataset options a run recorded: ``dataset_options`` (a dict) or ``dataset_option`` ("k=v" list)."""
    if isinstance(config.get("dataset_options"), dict):
        return dict(config["dataset_options"])
    return parse_pairs(config.get("dataset_option") or ())


def select_rows(certs, samples: str, section: str) -> np.ndarray:
    """Rows of ``certs`` for ``--samples``: ``certified``, ``all`` or a count N (the first N rows)."""
    if samples == "all":
        rows = np.arange(certs.num_samples)
    elif samples == "certified":
        rows = np.flatnonzero(certs.certified)
        if rows.size == 0:
            raise RobnetError(f"section {section!r} of the certificate has no certified sample; "
                              "use --samples all or --samples N to export unproven ones")
    else:
        try:
            count = int(samples)
        except ValueError:
            count = 0
        if count < 1:
            raise RobnetError(f"--samples {samples!r}: expected certified, all or a positive number")
        rows = np.arange(min(count, certs.num_samples))
    if rows.size == 0:
        raise RobnetError(f"section {section!r} of the certificate has no sample")
    return rows


def load_sources(certificate: str | Path, model: str | Path, *, dataset: str | None, data_dir: str | None,
                 samples: str, reporter: Reporter = SILENT) -> Sources:
    """Read and cross-check certificate, model and dataset (RobnetError, one line, on any mismatch);
    ``reporter``: where loading the dataset reports."""
    from robnet_svc.onnx_io import load_model, read_onnx
    from robnet_svc.plugins import load_registry
    from robnet_svc.report import read_report

    report = read_report(certificate)
    prov = report.provenance
    model = Path(model)
    source, sha = read_onnx(model)
    matching = [name for name, attrs in report.section_attrs.items() if attrs.get("model_sha256") == sha]
    if not matching:
        known = ", ".join(f"{n} ({a.get('model', '?')})" for n, a in report.section_attrs.items())
        raise RobnetError(f"{model} is none of the models certified in {certificate} (sha256 differs from "
                          f"every section: {known}); give the model file the certificate is about")
    section = matching[-1]
    certs = report.sections[section]
    rows = select_rows(certs, samples, section)

    image_shape = "x".join(str(s) for s in prov.image_shape)
    imported = load_model(model, image_shape=image_shape or None)
    config = prov.config
    recorded = prov.dataset
    if dataset is not None and dataset != recorded:
        raise RobnetError(f"--dataset {dataset} differs from the certificate's dataset {recorded!r}")
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    registry = load_registry()
    dataset_cls = registry.dataset(recorded)
    if dataset_cls.needs_data_dir and not data_dir:
        raise RobnetError(f"dataset {recorded!r} needs --data-dir (the certificate does not record one)")
    if data_dir and not Path(data_dir).is_dir():
        raise RobnetError(f"--data-dir {data_dir} is not a folder")
    splits = dataset_cls(data_dir, **_dataset_options(config)).load(imported.image_shape, reporter=reporter)
    index = certs.index[rows]
    if index.max() >= splits.test_labels.shape[0]:
        raise RobnetError(f"the certificate names test sample {int(index.max())} but dataset {recorded!r} has "
                          f"{splits.test_labels.shape[0]}: not the dataset that was certified")
    labels = splits.test_labels[torch.from_numpy(index)].numpy()
    wrong = np.flatnonzero(labels != certs.label[rows])
    if wrong.size:
        i = int(wrong[0])
        raise RobnetError(f"test sample {int(index[i])} of dataset {recorded!r} has label {int(labels[i])} but the "
                          f"certificate says {int(certs.label[rows][i])}: not the dataset that was certified")

    spec = dict(prov.perturbation)
    name, eps, clip = spec.pop("name", None), spec.pop("eps", None), spec.pop("clip", None)
    perturbation = registry.perturbation(name)(eps, clip=tuple(clip) if clip else None,
                                               **{k: v for k, v in spec.items() if v is not None})
    images = splits.test_images[torch.from_numpy(index)]
    probe = perturbation.affine_set(images[:1])
    for key, got in (("coeff_lower", probe.lower[0]), ("coeff_upper", probe.upper[0])):
        recorded_box = getattr(prov, key)
        if recorded_box.shape != tuple(got.shape) or not np.array_equal(recorded_box, got.double().numpy()):
            raise RobnetError(f"the perturbation rebuilt from the certificate ({prov.json_text('perturbation')}) "
                              f"gives another coefficient box than the recorded {key}; this robnet-svc or "
                              "perturbation plugin differs from the one that certified")
    method = report.section_attrs[section].get("method") or prov.cert_method
    return Sources(report, section, imported, source, perturbation, method, images, rows)


# --------------------------------------------------------------------------- the network


def _strip_head(model: onnx.ModelProto, head: str | None) -> None:
    """Make the logits (the input of a trailing Softmax/LogSoftmax) the graph output."""
    from robnet_svc.onnx_io.parity import _logits_value

    if head is None:
        return
    logits = _logits_value(model)
    old = model.graph.output[0]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(logits, old.type.tensor_type.elem_type, None))
    needed, stack = set(), [logits]
    producers = {out: n for n in model.graph.node for out in n.output}
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    kept = [n for n in model.graph.node if id(n) in needed]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def coefficient_network(source: onnx.ModelProto, imported, weights: np.ndarray | None, offset: np.ndarray,
                        clip: tuple[float, float] | None, metadata: dict[str, str]) -> onnx.ModelProto:
    """The user's graph behind ``clip(W a + c)``: ``weights [k, n]`` (None: ``W = I``) and
    ``offset [n]`` in the element order of the ONNX input (``n`` values per sample)."""
    from onnx import version_converter

    from robnet_svc.onnx_io import default_opset
    from robnet_svc.onnx_io.base import graph_inputs as _graph_inputs

    model = copy.deepcopy(source)
    if default_opset(model) < MIN_OPSET:
        model = version_converter.convert_version(model, 13)
    _strip_head(model, imported.head)
    graph = model.graph
    (original,) = _graph_inputs(model)
    batch = original.type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value") and batch.dim_value != 1:
        raise RobnetError(f"{imported.path} has a fixed batch size {batch.dim_value}; export-vnnlib needs a "
                          "model with batch 1 or a dynamic batch axis")
    elem = original.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    n = int(np.prod(imported.input_shape))
    k = n if weights is None else weights.shape[0]
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {t.name for t in graph.initializer}

    def fresh(name: str) -> str:
        name = f"robnet_{name}"
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    initializers, nodes = [], []

    def const(name: str, value: np.ndarray, as_type=dtype) -> str:
        tensor_name = fresh(name)
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=as_type), tensor_name))
        return tensor_name

    lo = 0.0 if clip is None else float(clip[0])
    bias = (offset.astype(np.float64) - lo).reshape(1, n)
    current = fresh("transform")
    if weights is None:
        nodes.append(helper.make_node("Add", [INPUT_NAME, const("offset", bias)], [current], name=current))
    else:
        nodes.append(helper.make_node("Gemm", [INPUT_NAME, const("weights", weights.T), const("offset", bias[0])],
                                      [current], name=current, transB=1))
    if clip is not None:
        hi = float(clip[1])
        for op, args in (("Relu", None), ("Sub", hi - lo), ("Relu", None), ("Sub", hi)):
            out = fresh("clip_" + op.lower())
            inputs = [current] if args is None else [const("clip_const", np.full((1, n), args)), current]
            nodes.append(helper.make_node(op, inputs, [out], name=out))
            current = out
    shape = const("input_shape", np.array([1, *imported.input_shape]), as_type=np.int64)
    nodes.append(helper.make_node("Reshape", [current, shape], [original.name], name=fresh("to_input")))

    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, elem, [1, k]))
    graph.initializer.extend(initializers)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    out = graph.output[0]
    out_elem = out.type.tensor_type.elem_type
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(out.name, out_elem, [1, imported.num_classes]))
    del graph.value_info[:]
    model.producer_name = "robnet-svc export-vnnlib"
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
    onnx.checker.check_model(model)
    return model


def _transform(aset, imported) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-sample ``(weights [B, k, n] or None, offset [B, n])`` in the ONNX input's element order."""
    if aset.supports_dense:
        weights, offset = aset.dense()
        weights, offset = weights.detach().double().numpy(), offset.detach().double().numpy()
    else:
        weights, offset = None, aset.offset.detach().double().numpy()
    if imported.layout == "NHWC":  # the image is CHW, the ONNX input HWC
        offset = offset.transpose(0, 2, 3, 1)
        weights = None if weights is None else weights.transpose(0, 1, 3, 4, 2)
    b = offset.shape[0]
    return (None if weights is None else weights.reshape(b, weights.shape[1], -1)), offset.reshape(b, -1)


# --------------------------------------------------------------------------- checks


class _Reference:
    """The user's model in onnxruntime (original file, logits output) on images ``[B, C, H, W]``."""

    def __init__(self, imported, source: onnx.ModelProto):
        from robnet_svc.onnx_io import ADAPTER_NAME, ort_session
        from robnet_svc.onnx_io.base import dims as _dims, graph_inputs as _graph_inputs
        from robnet_svc.onnx_io.parity import _logits_value, _ort_runner

        model = source
        if imported.head:
            model = copy.deepcopy(source)
            model.graph.output.append(helper.make_tensor_value_info(
                _logits_value(model), model.graph.output[0].type.tensor_type.elem_type, None))
        batch = _dims(_graph_inputs(source)[0])[0]
        self.run = _ort_runner(ort_session(model.SerializeToString()),
                               batch if isinstance(batch, int) and batch > 0 else None)
        self.adapter = dict(imported.module.named_children()).get(ADAPTER_NAME, torch.nn.Identity())
        self.dtype = imported.input_dtype

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            x = self.adapter(images).numpy().astype(self.dtype)
        return self.run(x)[-1]


def _agree(got: np.ndarray, expected: np.ndarray) -> float:
    """Worst ``|got - expected| / (ATOL + RTOL |expected|)``: <= 1 means they agree."""
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return float((diff / (ATOL + RTOL * np.abs(expected.astype(np.float64)))).max())


# --------------------------------------------------------------------------- export


def export_vnnlib(certificate: str | Path, model: str | Path, out: str | Path, *, dataset: str | None = None,
                  data_dir: str | None = None, samples: str = "certified", timeout: float = 300.0,
                  force: bool = False, device: str = "cpu", reporter: Reporter = SILENT) -> dict:
    """Write the instances of the selected samples to folder ``out`` (see the module docstring);
    return the summary stored as ``export.json``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RobnetError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RobnetError(f"--out {out} exists and is not empty; use --force to overwrite")
    if not out.parent.is_dir():
        raise RobnetError(f"--out {out}: folder {out.parent} does not exist")
    src = load_sources(certificate, model, dataset=dataset, data_dir=data_dir, samples=samples, reporter=reporter)
    prov = src.report.provenance
    certificate_sha = _sha256(Path(certificate))
    reference = _Reference(src.imported, src.source)
    reporter.log(f"exporting {len(src.rows)} sample(s) of section {src.section!r} ({src.cert_method}) to {out}")
    instances: list[dict] = []
    with atomic_folder(out, replace=force) as tmp:
        (tmp / "onnx").mkdir()
        (tmp / "vnnlib").mkdir()
        for start in range(0, len(src.rows), CHUNK):
            part = slice(start, start + CHUNK)
            entries, aset = _export_chunk(src, src.rows[part], src.images[part], reference, tmp, certificate_sha,
                                          device, reporter)
            instances += entries
            reporter.log(f"  {len(instances)}/{len(src.rows)} exported and checked")
        (tmp / "instances.csv").write_text("".join(f"{i['onnx']},{i['vnnlib']},{timeout:g}\n" for i in instances))
        summary = {
            "certificate": str(certificate), "certificate_sha256": certificate_sha, "section": src.section,
            "model": str(model), "model_sha256": src.imported.sha256, "dataset": prov.dataset,
            "perturbation": prov.perturbation, "method": src.cert_method,
            "num_coefficients": int(len(prov.coeff_lower)),
            "coefficient_names": prov.coeff_names,
            "input_name": INPUT_NAME, "opset": _opset(src.source), "added_ops": _added_ops(aset),
            "timeout": timeout, "num_instances": len(instances),
            "num_certified": int(sum(i["certified"] for i in instances)),
            "checks": {"random_coefficients_per_sample": RANDOM_CHECKS, "atol": ATOL, "rtol": RTOL,
                       "verdicts_agree": all(i["verdicts_agree"] for i in instances),
                       "verdicts_disagree": int(sum(not i["verdicts_agree"] for i in instances)),
                       "max_margin_difference": max(i["max_margin_difference"] for i in instances)},
            "instances": instances,
        }
        (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(summary))
    return summary


def _export_chunk(src: Sources, rows: np.ndarray, images: torch.Tensor, reference: _Reference, tmp: Path,
                  certificate_sha: str, device: str, reporter: Reporter) -> tuple[list[dict], object]:
    """Write and check the instances of certificate ``rows`` (test images ``images``); return their
    export.json entries and their affine set."""
    from robnet_svc.onnx_io import ort_session
    from robnet_svc.vnnlib_verify import verify_instance

    certs, prov = src.report.sections[src.section], src.report.provenance
    class_names = src.report.class_names
    aset = src.perturbation.affine_set(images)
    weights, offset = _transform(aset, src.imported)
    k = aset.num_coeffs
    generator = torch.Generator().manual_seed(int(certs.index[rows[0]]))
    coeffs = torch.cat([aset.nominal.unsqueeze(1), aset.sample(RANDOM_CHECKS, generator)], dim=1)  # [B, R, k]
    with torch.no_grad():
        clean = reference(images)
        perturbed = aset.clipped(aset.images(coeffs))
        expected = reference(perturbed.reshape(-1, *perturbed.shape[2:])).reshape(*coeffs.shape[:2], -1)
    entries = []
    for b, row in enumerate(rows):
        index, label = int(certs.index[row]), int(certs.label[row])
        onnx_rel, vnnlib_rel = f"onnx/sample_{index}.onnx", f"vnnlib/prop_{index}.vnnlib"
        network = coefficient_network(
            src.source, src.imported, None if weights is None else weights[b], offset[b], aset.clip,
            {"robnet_svc.certificate_sha256": certificate_sha, "robnet_svc.sample_index": str(index),
             "robnet_svc.label": str(label), "robnet_svc.perturbation": prov.json_text("perturbation")})
        data = network.SerializeToString()
        (tmp / onnx_rel).write_bytes(data)
        name = f" ({class_names[label]})" if label < len(class_names) else ""
        (tmp / vnnlib_rel).write_text(property_text(
            aset.lower[b].double().numpy(), aset.upper[b].double().numpy(), label, src.imported.num_classes,
            [f"robnet-svc export-vnnlib: test sample {index} of dataset {prov.dataset}, label {label}{name}",
             f"certificate sha256 {certificate_sha}, section {src.section}, method {src.cert_method}",
             f"perturbation {prov.json_text('perturbation')}",
             f"inputs X_0..X_{k - 1}: coefficients {_names(prov.coeff_names)}"]))

        # checks 1 and 2: onnxruntime, exported network vs the model
        session = ort_session(data)
        dtype = src.imported.input_dtype
        got = np.concatenate([session.run(None, {INPUT_NAME: c[None].numpy().astype(dtype)})[0] for c in coeffs[b]])
        nominal_err, random_err = _agree(got[:1], clean[b:b + 1]), _agree(got[1:], expected[b, 1:])
        if not (nominal_err <= 1 and random_err <= 1):
            what = ("the nominal coefficients vs the clean image" if nominal_err > 1
                    else "random coefficients vs the perturbed, clipped image")
            raise ExportCheckError(f"export check failed for test sample {index}: onnxruntime on the exported "
                                   f"network disagrees with the model at {what} (worst difference "
                                   f"{max(nominal_err, random_err):.3g} x tolerance); nothing written")
        # check 3: our engine on the written files reaches the certificate's verdict
        recertified = verify_instance(tmp / onnx_rel, tmp / vnnlib_rel, [src.cert_method],
                                      attack=AttackSettings(steps=0, restarts=0), device=device).methods[0]
        was = bool(certs.certified[row])
        agree = (recertified.verdict == "verified") == was
        if not agree:
            # Both are sound bounds of the same margins; the certificate's may be tighter, since
            # certification bounds the clipping layer from the set directly while the export
            # bounds it as the plain ONNX ops a verifier reads. Recorded, not fatal.
            reporter.log(f"  note: test sample {index}: the certificate says "
                         f"{'certified' if was else 'not certified'} (smallest margin lower bound "
                         f"{float(certs.margin_lower[row].min()):.6g}), {src.cert_method} on the exported network "
                         f"gives {recertified.verdict} (smallest {min(recertified.margin_lower):.6g})")
        difference = np.abs(np.asarray(recertified.margin_lower) - certs.margin_lower[row].astype(np.float64))
        entries.append({
            "onnx": onnx_rel, "vnnlib": vnnlib_rel, "sample_index": index, "label": label,
            "prediction": int(certs.prediction[row]), "certified": was,
            "margin_lower": [float(v) for v in certs.margin_lower[row]],
            "recertified": recertified.verdict, "recertified_margin_lower": recertified.margin_lower,
            "verdicts_agree": agree,
            "max_margin_difference": float(difference.max()),
            "onnxruntime_nominal_vs_tolerance": nominal_err, "onnxruntime_random_vs_tolerance": random_err,
        })
    return entries, aset


def _names(names: list[str], shown: int = 32) -> str:
    """The coefficient names, the first ``shown`` of them when there are more (linf: one per pixel)."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _added_ops(aset) -> list[str]:
    """The ops in front of the user's graph, in order."""
    clip = ["Relu", "Sub", "Relu", "Sub"] if aset.clip is not None else []
    return ["Gemm" if aset.supports_dense else "Add", *clip, "Reshape"]


def _opset(model: onnx.ModelProto) -> int:
    """The exported networks' opset: the model's, or 13 for models older than ``MIN_OPSET``."""
    from robnet_svc.onnx_io import default_opset

    return default_opset(model) if default_opset(model) >= MIN_OPSET else 13


def _readme(summary: dict) -> str:
    return f"""# VNN-COMP instances exported by robnet-svc

Certificate `{summary['certificate']}` (sha256 `{summary['certificate_sha256']}`), section
`{summary['section']}`, model `{summary['model']}`, dataset `{summary['dataset']}`,
perturbation `{json.dumps(summary['perturbation'])}`, certified with `{summary['method']}`.

{summary['num_instances']} instance(s) in `instances.csv` (`onnx,vnnlib,timeout`), {summary['num_certified']} of
them certified by robnet-svc. Each network's input `{summary['input_name']}` [1, {summary['num_coefficients']}] is the
coefficient vector of one test sample's perturbation (X_i in the order {_names(summary['coefficient_names'])});
its outputs are the model's logits. A property is the coefficient box and the unsafe disjunction
"some other class >= the label": an independent verifier agrees with a robnet-svc certificate when
it answers `unsat` (holds) on a certified instance. `export.json` lists every instance with
robnet-svc's margin lower bounds and the checks run on export. See robnet-svc's docs/vnnlib.md.
"""
