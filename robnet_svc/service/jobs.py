"""A submitted job's settings -> the command line's own resolved and validated options.

A client sends its settings as a JSON object of option names and values
(``{"eps": 0.05, "epochs": 2, "dataset-option": ["cache=false"]}``, the names of
``robnet-svc harden --help``, dashes or underscores). They are turned into the arguments of
the real ``harden`` / ``certify`` click command and parsed by it, so every type, range and
choice is checked by the same code with the same message as on the command line; then
``pipeline.prepare(check_only=True)`` runs the command line's checks of model, dataset,
perturbation and methods. Only the data-dependent checks (e.g. the dataset's number of
classes against the model's) wait for the job's run, where they fail the job with the
same one line.

Options that name server paths or steer the server's own handling are refused: the model
is the upload, the output folder is the job's, and a dataset's folder is named by the
server (``--data-root NAME=PATH``), never by a client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robnet_svc.errors import RobnetError

COMMANDS = ("harden", "certify")
INPUT_FILE = "input.onnx"  # the upload, inside the job's folder (client file names are never used)
OUT_DIR = "out"
ARTIFACTS = {"harden": ("model.robust.onnx", "certificate.h5", "summary.json"),
             "certify": ("certificate.h5", "summary.json")}

#: Options a client may not set, and why (the line it gets back).
SERVER_SIDE = {
    "model": "the model is the uploaded file",
    "data_dir": "datasets are named by the server (robnet-svc serve --data-root NAME=PATH); "
                "give --dataset NAME (GET /v1/plugins lists them)",
    "out": "each job has its own output folder on the server; download the artifacts instead",
    "force": "each job has its own output folder on the server",
    "resume": "the server resumes interrupted jobs by itself",
    "config": "send the settings themselves (robnet-svc submit reads --config on the client)",
    "as_json": "the API answers JSON",
    "fail_under": "the gate is applied by the client (robnet-svc submit --fail-under)",
    "strict": "a job's summary.json says it: selection.within_budget (robnet-svc harden --strict is local)",
}


def parse_settings(command: str, settings: Any) -> dict[str, Any]:
    """Every option of ``command`` resolved from ``settings`` as the command line resolves it
    (click's types, ranges, choices and defaults); RobnetError with click's message otherwise."""
    import click

    from robnet_svc.cli import certify_cmd, harden_cmd

    if command not in COMMANDS:
        raise RobnetError(f"command {command!r} is not one of {', '.join(COMMANDS)}")
    if not isinstance(settings, dict):
        raise RobnetError('settings must be a JSON object of option names and values, e.g. {"eps": 0.05}')
    cmd = harden_cmd if command == "harden" else certify_cmd
    options: dict[str, click.Option] = {}
    for param in cmd.params:
        if isinstance(param, click.Option):
            options[param.name] = param
            for opt in param.opts:
                options[opt.lstrip("-").replace("-", "_")] = param
    args: list[str] = []
    for key, value in settings.items():
        name = str(key).strip().lstrip("-").replace("-", "_")
        param = options.get(name)
        if param is not None and param.name in SERVER_SIDE or name in SERVER_SIDE:
            raise RobnetError(f"setting {key!r} is not accepted by the server: "
                              f"{SERVER_SIDE[param.name if param is not None else name]}")
        if param is None:
            known = sorted({p.opts[0].lstrip('-') for p in options.values() if p.name not in SERVER_SIDE})
            raise RobnetError(f"unknown setting {key!r} for {command}; known: {', '.join(known)}")
        flag = param.opts[0]
        values = value if param.multiple and isinstance(value, list) else [value]
        for item in values:
            if param.is_flag:
                if not isinstance(item, bool):
                    raise RobnetError(f"setting {key!r} is a flag: true or false, not {item!r}")
                if item:
                    args.append(flag)
            elif item is None:
                continue
            elif isinstance(item, (dict, list)):
                raise RobnetError(f"setting {key!r} takes one value, not {type(item).__name__} {item!r}")
            else:  # --name=value: a value can never be read as another option
                args.append(f"{flag}={str(item).lower() if isinstance(item, bool) else item}")
    try:
        with cmd.make_context(command, [*args, "--", INPUT_FILE]) as ctx:
            params = dict(ctx.params)
    except click.ClickException as exc:
        raise RobnetError(exc.format_message()) from None
    for name in SERVER_SIDE:  # belt and braces: nothing server-side came through
        if name in params and name != "model" and params[name] not in (None, False):
            raise RobnetError(f"setting {name!r} is not accepted by the server")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def resolve_data_dir(params: dict[str, Any], data_roots: dict[str, str]) -> str | None:
    """The server's folder for the job's dataset (``--data-root``), None for a dataset that
    needs none; RobnetError for an unknown dataset or one this server does not serve."""
    from robnet_svc.plugins import load_registry

    name = params["dataset"]
    dataset_cls = load_registry().dataset(name)  # RobnetError listing the datasets for an unknown name
    if name in data_roots:
        return data_roots[name]
    if dataset_cls.needs_data_dir:
        served = ", ".join(sorted(data_roots)) or "none"
        raise RobnetError(f"dataset {name!r} is not served here: the server has no --data-root {name}=PATH "
                          f"(datasets with a root: {served}; GET /v1/plugins lists them)")
    return None


def build_options(params: dict[str, Any], model: Path, out: Path, data_dir: str | None, *,
                  force: bool = False, resume: bool = False):
    """``pipeline.Options`` of a job, as ``robnet-svc harden/certify`` builds them from its flags."""
    from robnet_svc.options import Options

    return Options.from_params(params, model=str(model), out=str(out), data_dir=data_dir, force=force,
                               resume=resume)


def check_job(command: str, params: dict[str, Any], model: Path, out: Path, data_dir: str | None) -> None:
    """The command line's checks of a job before it is queued (RobnetError: one line)."""
    from robnet_svc import pipeline

    device = str(params.get("device", "auto"))
    if device.startswith("cuda:"):
        raise RobnetError(f"--device {device}: the server gives each job its GPU; use auto, cpu or cuda")
    options = build_options(params, model, out, data_dir, force=True)
    pipeline.prepare(options, training=command == "harden", check_only=True)


def recorded_config(params: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """The effective config stored in the certificate (as ``config.effective_config``), with the
    job's own paths left out so that equal jobs write byte-identical models."""
    from robnet_svc.config import NOT_RECORDED

    config = {k: v for k, v in sorted(params.items()) if k not in NOT_RECORDED}
    config["data_dir"] = data_dir
    return config
