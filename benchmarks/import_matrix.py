"""Which models users bring import, and what the bound engine says about them (issue 11).

    python -m benchmarks.import_matrix                         # everything (about an hour on 2 cores;
                                                               # the dynamo exporter takes most of it)
    python -m benchmarks.import_matrix --models resnet18,cnn_gelu --exporters dynamo --shapes 3

Each model of ``tests/model_zoo.py`` is built for 1x64x64 and 3x64x64 images with 4 classes,
exported with each exporter (legacy TorchScript at opset 13 and 17, dynamo at its default
opset and at 17), and imported exactly as ``robnet-svc inspect`` does (onnxruntime parity
included). One subprocess per model keeps memory flat. Prints a Markdown table, model x
exporter -> imports? / engine verdict, and writes the raw rows as JSON lines (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import model_zoo  # noqa: E402  (tests/model_zoo.py)


def _cell(name: str, exporter: str, channels: int, directory: Path, model) -> dict:
    """Export + inspect one model; a row of the table."""
    from robnet_svc.errors import RobnetError
    from robnet_svc.onnx_io import inspect_model

    row = {"model": name, "exporter": exporter, "channels": channels}
    start = time.perf_counter()
    path = directory / f"{name}_{exporter}_{channels}.onnx"
    try:
        model_zoo.export(model, path, exporter, (channels, model_zoo.IMAGE_SIZE, model_zoo.IMAGE_SIZE))
    except Exception as exc:  # the exporter's own failure, not ours
        row.update(status="export failed", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return row
    row["export_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    try:
        report = inspect_model(path)
    except RobnetError as exc:
        row.update(status="refused", detail=str(exc).split(": ", 1)[-1][:300])
        return row
    finally:
        path.unlink(missing_ok=True)
    engine = report["engine"]
    row.update(status="imports", import_s=round(time.perf_counter() - start, 1), opset=report["opset"],
               parity=report["parity_max_abs_diff"], rewrites=report["rewrites"],
               supported=engine["supported"],
               unsupported=sorted({r["onnx_op"] or r["torch_op"] for r in engine["unsupported"]}))
    return row


def _run_model(name: str, exporters: list[str], shapes: list[int]) -> None:
    """Child process: every exporter x shape of one model, one JSON row per line on stdout."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for channels in shapes:
            model = model_zoo.build(name, channels)
            for exporter in exporters:
                print(json.dumps(_cell(name, exporter, channels, Path(tmp), model)), flush=True)


def _verdict(row: dict) -> str:
    if row["status"] != "imports":
        return f"**{row['status']}**: {row.get('detail', '')}"
    engine = "supported" if row["supported"] else "unsupported: " + ", ".join(row["unsupported"])
    if row["supported"] is None:
        engine = "engine unknown"
    return f"imports ({engine})"


def table(rows: list[dict], exporters: list[str]) -> str:
    """Markdown: one line per model x shape, one column per exporter."""
    lines = ["| model | image | " + " | ".join(exporters) + " |", "|---|---|" + "---|" * len(exporters)]
    keys = sorted({(r["model"], r["channels"]) for r in rows}, key=lambda k: (list(model_zoo.MODELS).index(k[0]), k[1]))
    for name, channels in keys:
        cells = {r["exporter"]: _verdict(r) for r in rows if (r["model"], r["channels"]) == (name, channels)}
        lines.append(f"| {name} | {channels}x64x64 | " + " | ".join(cells.get(e, "-") for e in exporters) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(model_zoo.MODELS))
    parser.add_argument("--exporters", default=",".join(model_zoo.EXPORTERS))
    parser.add_argument("--shapes", default="1,3", help="image channels to try (64x64 each)")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines of every cell")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models, exporters = args.models.split(","), args.exporters.split(",")
    shapes = [int(s) for s in args.shapes.split(",")]
    if args.child:
        _run_model(models[0], exporters, shapes)
        return 0
    rows: list[dict] = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in models:
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-m", "benchmarks.import_matrix", "--child", "--models", name,
                                "--exporters", ",".join(exporters), "--shapes", args.shapes],
                               cwd=REPO, env=env, capture_output=True, text=True)
        got = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0:
            tail = (child.stderr.strip().splitlines() or ["?"])[-1][:200]
            got.append({"model": name, "exporter": exporters[0], "channels": shapes[0], "status": "crashed",
                        "detail": tail})
        rows += got
        if args.out:
            with args.out.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in got)
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(rows, exporters))
    return 0 if all(r["status"] in ("imports", "export failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
