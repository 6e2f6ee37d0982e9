"""The HTTP API (FastAPI; OpenAPI documentation at ``/docs`` and ``/openapi.json``).

``/v1/health`` (no token), and with ``Authorization: Bearer TOKEN``: ``POST /v1/jobs``
(multipart: ``model`` the ONNX file, ``command`` harden|certify, ``settings`` a JSON object
of options), ``GET /v1/jobs``, ``GET /v1/jobs/ID`` (state, live progress, summary,
artifacts with sha256), ``POST /v1/jobs/ID/cancel``, ``GET /v1/jobs/ID/artifacts/NAME``,
``DELETE /v1/jobs/ID`` (a finished job and its files), ``GET /v1/plugins``. A token sees
only its own jobs: another token's job is 404, as is an unknown one. Errors are
``{"detail": "one line"}`` (the CLI's line for bad settings).

State folder: ``jobs.sqlite`` (the store), ``jobs/ID/`` (``input.onnx``, ``out/``,
``worker.log``), ``uploads/`` (uploads being checked), ``server.lock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from robnet_svc import __version__
from robnet_svc.errors import RobnetError
from robnet_svc.service import jobs as jobspec
from robnet_svc.service.scheduler import Scheduler, Slot, make_slots
from robnet_svc.service.store import JobStore, new_job_id

ANONYMOUS = "anonymous"
FORM_SLACK = 64 * 1024  # room for the multipart framing and the settings field besides the model
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MIN_TOKEN_LENGTH = 16


@dataclass
class ServiceConfig:
    state_dir: Path
    tokens: dict[str, str] | None = None        # sha256(token) -> label; None: no authentication
    data_roots: dict[str, str] = field(default_factory=dict)
    max_upload_bytes: int = 256 * 1024 * 1024
    slots: list[Slot] = field(default_factory=list)


# --------------------------------------------------------------------------- response models


class Artifact(BaseModel):
    name: str
    sha256: str
    size: int
    url: str


class Job(BaseModel):
    id: str
    command: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: float
    started: float | None
    finished: float | None
    attempt: int
    input_sha256: str
    settings: dict[str, Any]
    progress: dict[str, Any] | None
    summary: dict[str, Any] | None
    artifacts: list[Artifact]
    error: str | None
    exit_code: int | None
    cancel_requested: bool


def _job_out(job: dict[str, Any]) -> Job:
    artifacts = [Artifact(name=name, url=f"/v1/jobs/{job['id']}/artifacts/{name}", **meta)
                 for name, meta in (job["artifacts"] or {}).items()] if job["state"] == "succeeded" else []
    return Job(**{k: v for k, v in job.items() if k in Job.model_fields and k != "artifacts"},
               artifacts=artifacts)


# --------------------------------------------------------------------------- the app


def create_app(config: ServiceConfig) -> FastAPI:
    """The API over ``config.state_dir``; its lifespan starts and stops the scheduler."""
    store = JobStore(config.state_dir)
    uploads = config.state_dir / "uploads"
    jobs_dir = config.state_dir / "jobs"
    scheduler = Scheduler(store, config.state_dir, config.slots, config.data_roots)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        _clean_state(store, uploads, jobs_dir)
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="robnet-svc", version=__version__, lifespan=lifespan,
                  description="Certifiably robust fine-tuning (harden) and certification of ONNX classifiers "
                              "as jobs (docs/service.md).")
    bearer = HTTPBearer(auto_error=False, description="A token from the server's --tokens file.")

    def owner(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if config.tokens is None:
            return ANONYMOUS
        digest = hashlib.sha256(credentials.credentials.encode()).hexdigest() if credentials else None
        if digest not in config.tokens:
            raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return digest

    def own_job(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        job = store.get(job_id, owner=who) if JOB_ID.match(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):
        """Refuse an oversize upload from its Content-Length, before a byte of it is read."""
        if request.method == "POST" and request.url.path.rstrip("/") == "/v1/jobs":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "uploads need a Content-Length"}, status_code=411)
            if int(length) > config.max_upload_bytes + FORM_SLACK:
                limit = config.max_upload_bytes / 2**20
                return JSONResponse({"detail": f"upload of {int(length) / 2**20:.1f} MiB is over this server's "
                                               f"limit of {limit:g} MiB (--max-upload-mb)"},
                                    status_code=413, headers={"Connection": "close"})
        return await call_next(request)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        """Liveness, version, worker slots and the upload limit (no token needed)."""
        return {"status": "ok", "version": __version__, "slots": [s.name for s in config.slots],
                "max_upload_bytes": config.max_upload_bytes}

    @app.get("/v1/plugins")
    def plugins(_who: str = Depends(owner)) -> dict[str, Any]:
        """Bound methods, perturbations (with options) and datasets (with options, and whether
        this server serves them), as ``robnet-svc plugins --json`` lists them."""
        from robnet_svc.plugins import load_registry

        registry = load_registry()
        listing = registry.listing()
        for row in listing["datasets"]:
            cls = registry.dataset(row["name"])
            row["needs_data_root"] = cls.needs_data_dir
            row["served"] = row["name"] in config.data_roots or not cls.needs_data_dir
        return listing

    @app.post("/v1/jobs", status_code=201, response_model=Job)
    def submit(model: UploadFile = File(..., description="The ONNX model."),
               command: Literal["harden", "certify"] = Form("harden"),
               settings: str = Form("{}", description='JSON object of options, e.g. {"eps": 0.05, "epochs": 2}'),
               who: str = Depends(owner)) -> Job:
        """Queue a job after the command line's checks of its settings and model (400: the CLI's line)."""
        uploads.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=uploads, suffix=".onnx")  # the client's file name is never used
        upload = Path(name)
        job_id = None
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as handle:
                for chunk in iter(lambda: model.file.read(1 << 20), b""):
                    size += len(chunk)
                    if size > config.max_upload_bytes:
                        raise HTTPException(413, "upload is over this server's limit (--max-upload-mb)")
                    digest.update(chunk)
                    handle.write(chunk)
            try:
                values = json.loads(settings)
            except ValueError as exc:
                raise HTTPException(400, f"settings are not JSON: {exc}") from None
            job_id = new_job_id()
            job_dir = jobs_dir / job_id
            try:
                params = jobspec.parse_settings(command, values)
                data_dir = jobspec.resolve_data_dir(params, config.data_roots)
                jobspec.check_job(command, params, upload, job_dir / jobspec.OUT_DIR, data_dir)
            except RobnetError as exc:  # the CLI's line, with the server's paths left out
                line = str(exc).replace(str(upload), "the uploaded model").replace(str(job_dir), "the job")
                raise HTTPException(400, " ".join(line.split())) from None
            job_dir.mkdir(parents=True)
            os.replace(upload, job_dir / jobspec.INPUT_FILE)
            store.add(who, command, params, digest.hexdigest(), job_id=job_id)
        except BaseException:
            upload.unlink(missing_ok=True)
            if job_id is not None and store.get(job_id) is None:
                shutil.rmtree(jobs_dir / job_id, ignore_errors=True)
            raise
        scheduler.wake()
        return _job_out(store.get(job_id))

    @app.get("/v1/jobs", response_model=list[Job])
    def list_jobs(who: str = Depends(owner)) -> list[Job]:
        """This token's jobs, newest first."""
        return [_job_out(j) for j in store.list(owner=who)]

    @app.get("/v1/jobs/{job_id}", response_model=Job)
    def job_status(job: dict[str, Any] = Depends(own_job)) -> Job:
        """State, live progress (phase, epoch, step, running loss and certified accuracy, ETA),
        and for a finished job its summary, artifacts (with sha256) or error line and exit code."""
        return _job_out(job)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job)
    def cancel(job: dict[str, Any] = Depends(own_job)) -> Job:
        """Cancel a queued job, or stop a running one (its state turns ``cancelled`` within a second)."""
        if job["state"] in ("queued", "running"):
            store.request_cancel(job["id"])
            scheduler.wake()
        return _job_out(store.get(job["id"]))

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete(job: dict[str, Any] = Depends(own_job)) -> None:
        """Forget a finished job and delete its files (409 while it is queued or running: cancel it first)."""
        if not store.delete(job["id"]):
            raise HTTPException(409, f"job {job['id']} is {job['state']}: cancel it first")
        shutil.rmtree(jobs_dir / job["id"], ignore_errors=True)  # a crash here: removed at the next start

    @app.get("/v1/jobs/{job_id}/artifacts/{name}", response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "The file; header X-Content-SHA256 carries its sha256."}})
    def artifact(name: str, job: dict[str, Any] = Depends(own_job)) -> FileResponse:
        """One output of a succeeded job (only complete, recorded files are ever served)."""
        if job["state"] != "succeeded":
            raise HTTPException(409, f"job {job['id']} is {job['state']}: artifacts come with success")
        meta = (job["artifacts"] or {}).get(name)
        if meta is None:
            raise HTTPException(404, f"job {job['id']} has no artifact {name!r}; it has "
                                     f"{', '.join(job['artifacts'] or {})}")
        path = jobs_dir / job["id"] / jobspec.OUT_DIR / name  # name is one of the recorded names
        return FileResponse(path, filename=name, media_type="application/octet-stream",
                            headers={"X-Content-SHA256": meta["sha256"]})

    app.state.store = store
    app.state.scheduler = scheduler
    return app


def _clean_state(store: JobStore, uploads: Path, jobs_dir: Path) -> None:
    """Remove what a killed server may have left half-done: uploads being checked, and job
    folders whose job was never recorded."""
    shutil.rmtree(uploads, ignore_errors=True)
    if jobs_dir.is_dir():
        known = {j["id"] for j in store.list(limit=10**9)}
        for folder in jobs_dir.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- robnet-svc serve


def read_tokens(path: str | Path) -> dict[str, str]:
    """The token file: one token per line (``#`` comments and blank lines skipped; text after
    the token and a space is a label). Returns sha256(token) -> label."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RobnetError(f"--tokens {path}: cannot read it ({exc.strerror})") from None
    tokens = {}
    for number, line in enumerate(lines, 1):
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts[0]) < MIN_TOKEN_LENGTH:
            raise RobnetError(f"--tokens {path}:{number}: a token must have at least {MIN_TOKEN_LENGTH} "
                              "characters (e.g. from `openssl rand -hex 32`)")
        tokens[hashlib.sha256(parts[0].encode()).hexdigest()] = parts[1].strip() if len(parts) > 1 else f"line {number}"
    if not tokens:
        raise RobnetError(f"--tokens {path} has no token")
    return tokens


def parse_data_roots(values: tuple[str, ...]) -> dict[str, str]:
    """``("mri=/data/mri", ...)`` -> ``{"mri": "/data/mri"}``; each NAME a dataset plugin, each PATH a folder."""
    from robnet_svc.plugins import load_registry

    registry = load_registry()
    roots = {}
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise RobnetError(f"--data-root {value!r} is not NAME=PATH (e.g. mri=/data/mri)")
        registry.dataset(name)  # RobnetError listing the datasets for an unknown name
        if not Path(path).is_dir():
            raise RobnetError(f"--data-root {name}={path}: {path} is not a folder")
        roots[name] = str(Path(path).resolve())
    return roots


def serve(host: str, port: int, state_dir: str, workers: int | None, data_roots: tuple[str, ...],
          tokens: str | None, max_upload_mb: float) -> None:
    """``robnet-svc serve``: check the settings, lock the state folder, run uvicorn until stopped."""
    import uvicorn

    if tokens is None and not _is_loopback(host):
        raise RobnetError(f"--host {host} is reachable from other machines: give --tokens FILE "
                          "(bearer tokens), or serve on 127.0.0.1 behind a proxy that authenticates")
    config = ServiceConfig(state_dir=Path(state_dir).resolve(), tokens=read_tokens(tokens) if tokens else None,
                           data_roots=parse_data_roots(data_roots), max_upload_bytes=int(max_upload_mb * 2**20))
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (config.state_dir / "server.lock").open("a")
    except OSError as exc:
        raise RobnetError(f"--state-dir {state_dir}: cannot use it ({exc.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RobnetError(f"--state-dir {config.state_dir} is in use by another robnet-svc serve") from None
    config.slots = make_slots(workers)
    app = create_app(config)
    print(f"robnet-svc: serving on http://{host}:{port} (state in {config.state_dir}; "
          f"{len(config.slots)} worker slot(s): {', '.join(s.name for s in config.slots)}; "
          f"authentication {'on' if config.tokens else 'off'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
