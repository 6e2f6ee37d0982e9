"""The client of ``robnet-svc serve``: what ``robnet-svc submit`` runs.

It imports httpx, click and rich only (no torch, no numpy): a deployment pipeline that
submits models installs robnet-svc without its heavy dependencies (docs/service.md), and
tests assert that torch stays unimported.

Exit codes are those of the local commands: 0 success, 1 certified accuracy under
``--fail-under``, 2 bad input (the server's one line) or an unusable server answer, 3 a
soundness or internal error of the job, 130 a cancelled job.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from robnet_svc.atomic import atomic_path
from robnet_svc.errors import RobnetError

POLL_SECONDS = 0.5


class JobFailed(Exception):
    """The job ended without success: ``line`` (the CLI's line) and the CLI's ``exit_code``."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line)
        self.line, self.exit_code = line, exit_code


class Client:
    """The API of one server (``/v1``), with a bearer token when given."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RobnetError(f"cannot reach the server {self.server}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            if not isinstance(detail, str):
                detail = json.dumps(detail) if detail is not None else response.text[:200]
            raise RobnetError(f"server answered {response.status_code}: {' '.join(detail.split())}")
        return response

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health").json()

    def submit(self, model: str | Path, command: str, settings: dict[str, Any]) -> dict[str, Any]:
        model = Path(model)
        try:
            handle = model.open("rb")
        except OSError as exc:
            raise RobnetError(f"cannot read model {model}: {exc.strerror}") from None
        with handle:
            return self._call("POST", "/v1/jobs", data={"command": command, "settings": json.dumps(settings)},
                              files={"model": ("model.onnx", handle, "application/octet-stream")}).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def download(self, job: dict[str, Any], folder: Path) -> dict[str, str]:
        """Every artifact of a succeeded ``job`` into ``folder`` (each written atomically, its
        sha256 checked against the server's); returns name -> sha256. The certificate must
        name the downloaded model's sha256 (summary.json's ``output_model_sha256``)."""
        folder.mkdir(parents=True, exist_ok=True)
        got = {}
        for artifact in job["artifacts"]:
            name = Path(artifact["name"]).name  # the server's name, never a path
            digest = hashlib.sha256()
            with atomic_path(folder / name) as tmp, tmp.open("wb") as handle:
                try:
                    with self.http.stream("GET", artifact["url"]) as response:
                        if response.status_code != 200:
                            raise RobnetError(f"server answered {response.status_code} for {artifact['url']}")
                        for chunk in response.iter_bytes():
                            digest.update(chunk)
                            handle.write(chunk)
                except httpx.HTTPError as exc:
                    raise RobnetError(f"downloading {artifact['url']} failed: {exc}") from None
                tmp.chmod(0o666 & ~_umask())  # an ordinary file, not the temporary file's 0600
                if digest.hexdigest() != artifact["sha256"]:
                    raise RobnetError(f"{name}: downloaded sha256 {digest.hexdigest()} differs from the server's "
                                      f"{artifact['sha256']}; download again")
            got[name] = digest.hexdigest()
        summary = json.loads((folder / "summary.json").read_text()) if "summary.json" in got else {}
        model_sha = summary.get("output_model_sha256")
        if "model.robust.onnx" in got and model_sha != got["model.robust.onnx"]:
            raise RobnetError(f"the certificate is for model sha256 {model_sha}, the downloaded model.robust.onnx "
                              f"has {got['model.robust.onnx']}")
        return got

    def wait(self, job_id: str) -> dict[str, Any]:
        """Poll the job until it ends, with a progress bar (a terminal) or its log lines (CI logs)
        on stderr; returns the succeeded job, raises JobFailed otherwise."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(stderr=True)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stats]}"), console=console, transient=True,
                       disable=not console.is_terminal)
        printed = 0
        with bar:
            task = bar.add_task("queued", total=None, stats="")
            while True:
                job = self.job(job_id)
                progress = job.get("progress") or {}
                count, lines = progress.get("log_count", 0), progress.get("log", [])  # the server keeps the last few
                for line in lines[max(0, len(lines) - (count - printed)):]:
                    console.print(f"robnet-svc: [job {job_id[:8]}] {line}", markup=False, highlight=False,
                                  soft_wrap=True)
                printed = count
                description, completed, total = _bar_state(job, progress)
                bar.update(task, description=description, completed=completed, total=total,
                           stats=_stats(progress))
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(POLL_SECONDS)
        if job["state"] == "cancelled":
            raise JobFailed(f"job {job_id} was cancelled", 130)
        if job["state"] == "failed":
            raise JobFailed(job.get("error") or "error: the job failed", job.get("exit_code") or 3)
        return job


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _bar_state(job: dict[str, Any], progress: dict[str, Any]) -> tuple[str, float, float | None]:
    phase = progress.get("phase") or job["state"]
    if job["state"] == "queued":
        return "queued", 0, None
    if phase == "train":
        return f"epoch {progress.get('epoch')}/{progress.get('epochs')}", progress.get("step", 0), progress.get("steps")
    return phase, progress.get("done", 0), progress.get("total")


def _stats(progress: dict[str, Any]) -> str:
    parts = []
    if progress.get("phase") == "train" and "loss" in progress:
        parts.append(f"loss {progress['loss']:.3f}  cert {progress.get('certified_accuracy', 0):.3f}")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {progress['eta_seconds']:.0f}s")
    return "  ".join(parts)


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text().split()
    except OSError as exc:
        raise RobnetError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if not lines:
        raise RobnetError(f"--token-file {path} is empty")
    return lines[0]


def run_submit(model: str, server: str, token_file: str | None, command: str, settings: dict[str, Any], *,
               wait: bool, fail_under: float | None, download: str | None, as_json: bool) -> int:
    """``robnet-svc submit``: returns the exit code (0, 1 under ``fail_under``)."""
    client = Client(server, read_token(token_file))
    job = client.submit(model, command, settings)
    click.echo(f"robnet-svc: submitted job {job['id']} to {client.server}", err=True)
    if not (wait or fail_under is not None or download):
        click.echo(json.dumps(job, indent=2) if as_json else job["id"])
        return 0
    try:
        job = client.wait(job["id"])
    except JobFailed as exc:
        click.echo(f"robnet-svc: {exc.line}", err=True)
        return exc.exit_code
    summary = job["summary"]
    if download:
        client.download(job, Path(download))
    _print_summary(summary, as_json)
    if download and not as_json:
        for artifact in job["artifacts"]:
            click.echo(f"wrote {Path(download) / artifact['name']} (sha256 {artifact['sha256']})")
    section = "after" if command == "harden" else "model"
    certified = summary["sections"][section]["certified_accuracy"]
    if fail_under is not None and certified < fail_under:
        click.echo(f"robnet-svc: certified accuracy {certified:.4f} is under --fail-under {fail_under}", err=True)
        return 1
    return 0


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("", "clean acc", "certified acc", "empirical robust acc", "n"):
        table.add_column(col, justify="right" if col else "left")
    for name, s in summary["sections"].items():
        table.add_row(name, f"{100 * s['clean_accuracy']:.1f}%", f"{100 * s['certified_accuracy']:.1f}%",
                      f"{100 * s['empirical_robust_accuracy']:.1f}%", str(s["num_samples"]))
    Console(file=sys.stdout).print(table)
