"""``robnet-svc serve`` and ``submit`` end to end: a real server process on a loopback port,
real jobs on the embedded digits (tiny settings), real downloads and certificates.

Every wait is bounded (``DEADLINE``); servers are killed at the end of their test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cli_support import FAST

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 240.0  # seconds: the longest any wait below may take on a loaded machine
TOKEN_A = "a" * 32
TOKEN_B = "b" * 32
AUTH_A = {"Authorization": f"Bearer {TOKEN_A}"}
AUTH_B = {"Authorization": f"Bearer {TOKEN_B}"}
FAST_SETTINGS = {"dataset": "digits", "eps": 0.05, "order": 1, "max-test": 16, "attack-steps": 3,
                 "attack-restarts": 2, "device": "cpu", "max-train": 128, "batch-size": 32}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``robnet-svc serve`` in a subprocess on 127.0.0.1 (tokens A and B, 1 MiB uploads)."""

    def __init__(self, state_dir: Path, tokens: Path):
        self.state_dir, self.tokens = state_dir, tokens
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Server":
        for _try in range(3):  # a port taken meanwhile by someone else: try another
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            log = (self.state_dir.parent / f"server-{port}.log").open("wb")
            self.process = subprocess.Popen(
                [sys.executable, "-m", "robnet_svc.cli", "serve", "--port", str(port), "--state-dir",
                 str(self.state_dir), "--tokens", str(self.tokens), "--max-upload-mb", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=self.state_dir.parent)
            until = time.monotonic() + DEADLINE
            while time.monotonic() < until and self.process.poll() is None:
                try:
                    if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    time.sleep(0.2)
            self.stop()
        raise AssertionError(f"the server did not start; see {log.name}")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self, headers=AUTH_A) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("service-tokens") / "tokens"
    path.write_text(f"# team tokens\n{TOKEN_A} team-a\n{TOKEN_B} team-b\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokens):
    srv = Server(tmp_path_factory.mktemp("service") / "state", tokens).start()
    yield srv
    srv.stop()


def _submit(http: httpx.Client, model: Path, settings: dict, command: str = "harden") -> httpx.Response:
    return http.post("/v1/jobs", data={"command": command, "settings": json.dumps(settings)},
                     files={"model": ("../../evil name.onnx", model.read_bytes())})


def _wait(http: httpx.Client, job_id: str, until=lambda job: job["state"] in ("succeeded", "failed", "cancelled"),
          poll: float = 0.1) -> dict:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if until(job):
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} did not get there in {DEADLINE}s: {job['state']} {job['progress']}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- refusals (no job runs)


def test_tokens_uploads_and_settings_are_checked_and_nothing_is_stored(server, digits_onnx, tmp_path):
    anonymous = server.client(headers={})
    assert anonymous.get("/v1/health").status_code == 200
    assert anonymous.get("/v1/jobs").status_code == 401
    wrong = server.client(headers={"Authorization": "Bearer " + "c" * 32})
    assert wrong.get("/v1/jobs").status_code == 401
    assert _submit(wrong, digits_onnx, FAST_SETTINGS).status_code == 401

    http = server.client()
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(2 * 2**20))
    oversize = _submit(http, big, FAST_SETTINGS)
    assert oversize.status_code == 413 and "limit of 1 MiB" in oversize.json()["detail"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    malformed = _submit(http, garbage, FAST_SETTINGS)
    assert malformed.status_code == 400 and "is not an ONNX model" in malformed.json()["detail"]
    assert str(server.state_dir) not in malformed.json()["detail"]  # no server path in the answer
    # the command line's own checks and lines
    cases = {
        json.dumps({"eps": "abc"}): "Invalid value for '--eps': 'abc' is not a valid float.",
        json.dumps({"eps": -1}): "--eps must be > 0",
        json.dumps({"epochs": 0}): "Invalid value for '--epochs'",
        json.dumps({"data-dir": "/etc"}): "datasets are named by the server",
        json.dumps({"out": "/tmp/x"}): "own output folder",
        json.dumps({"dataset": "mri"}): "dataset 'mri' is not served here",
        json.dumps({"dataset": "--out=/tmp/x"}): "unknown dataset",
        json.dumps({"cert-method": "nope"}): "nope",
        json.dumps({"bogus": 1}): "unknown setting 'bogus'",
        "[1": "settings are not JSON",
    }
    for settings, line in cases.items():
        answer = http.post("/v1/jobs", data={"settings": settings},
                           files={"model": ("m.onnx", digits_onnx.read_bytes())})
        assert answer.status_code == 400, (settings, answer.text)
        assert line in answer.json()["detail"], (settings, answer.json())
    assert http.post("/v1/jobs", data={"settings": "{}"}).status_code == 422  # no model part
    assert http.get("/v1/jobs").json() == []
    assert not any((server.state_dir / "jobs").glob("*")) and not any((server.state_dir / "uploads").glob("*"))

    # cancel: a job cancelled at once (queued, or its worker stopped) ends cancelled, with nothing to download
    job_id = _submit(http, digits_onnx, {**FAST_SETTINGS, "epochs": 50}).raise_for_status().json()["id"]
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelled", "running")
    job = _wait(http, job_id)
    assert job["state"] == "cancelled" and job["exit_code"] == 130 and job["artifacts"] == []
    assert http.get(f"/v1/jobs/{job_id}/artifacts/summary.json").status_code == 409
    assert server.client(AUTH_B).delete(f"/v1/jobs/{job_id}").status_code == 404
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert http.get(f"/v1/jobs/{job_id}").status_code == 404 and not (server.state_dir / "jobs" / job_id).exists()

    plugins = http.get("/v1/plugins").json()
    served = {row["name"]: row["served"] for row in plugins["datasets"]}
    assert served["digits"] is True and served["mri"] is False
    assert {"rsip-ssip", "ibp"} <= {row["name"] for row in plugins["bound_methods"]}


def test_submit_client_imports_no_torch():
    code = ("import sys\nfrom robnet_svc.cli import main\nimport robnet_svc.service.client\n"
            "try:\n    main(['submit', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'onnx', 'fastapi') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--fail-under" in done.stdout and "--data-dir" not in done.stdout


# --------------------------------------------------------------------------- the pipeline step


def test_pipeline_step_progress_download_and_isolation(server, digits_onnx, tmp_path):
    """``submit --wait --fail-under --download`` as a CI step would run it, while the test follows
    the job's progress, polls it 20 times at once, and checks another token cannot see it."""
    download = tmp_path / "dl"
    wrapper = ("import sys\nfrom robnet_svc.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
               "    print('HEAVY' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_A + "\n")
    argv = [sys.executable, "-c", wrapper, "submit", str(digits_onnx), "--server", server.url, "--token-file",
            str(token_file), *FAST, "--max-test", "16", "--epochs", "6", "--max-train", "128",
            "--batch-size", "32", "--wait", "--fail-under", "0.5", "--download", str(download), "--json"]
    http = server.client()
    before = {j["id"] for j in http.get("/v1/jobs").json()}
    client = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE
    while not {j["id"] for j in http.get("/v1/jobs").json()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    (job_id,) = {j["id"] for j in http.get("/v1/jobs").json()} - before
    seen, polled = [], []

    def poll_once(_i):
        return server.client().get(f"/v1/jobs/{job_id}").status_code

    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        seen.append(job["progress"] or {})
        if job["state"] == "running" and (job["progress"] or {}).get("phase") == "train" and not polled:
            with ThreadPoolExecutor(20) as pool:
                polled = list(pool.map(poll_once, range(20)))
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    out, err = client.communicate(timeout=DEADLINE)
    assert client.returncode == 0, err
    assert err.strip().endswith("LIGHT")  # the client never imported torch

    assert polled == [200] * 20
    train = [p for p in seen if p.get("phase") == "train" and "loss" in p]
    assert train, seen
    assert {"epoch", "epochs", "step", "steps", "loss", "certified_accuracy", "eps"} <= set(train[-1])
    assert train[-1]["epochs"] == 6
    assert any(p.get("eta_seconds") is not None and p["eta_seconds"] > 0 for p in train)

    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["exit_code"] == 0
    assert job["input_sha256"] == _sha256(digits_onnx)
    summary = json.loads(out)
    assert summary == json.loads((download / "summary.json").read_text()) == job["summary"]
    for artifact in job["artifacts"]:
        assert _sha256(download / artifact["name"]) == artifact["sha256"]
    from robnet_svc.report import read_report

    report = read_report(download / "certificate.h5")
    model_sha = _sha256(download / "model.robust.onnx")
    assert report.provenance.output_model_sha256 == model_sha == summary["output_model_sha256"]
    assert report.section_attrs["after"]["model_sha256"] == model_sha
    assert report.provenance.input_model_sha256 == _sha256(digits_onnx)
    # the client's file name never reached the file system
    assert sorted(p.name for p in (server.state_dir / "jobs" / job_id).iterdir()) == \
        ["input.onnx", "lock", "out", "worker.log"]

    other = server.client(AUTH_B)
    assert other.get(f"/v1/jobs/{job_id}").status_code == 404
    assert other.get(f"/v1/jobs/{job_id}/artifacts/model.robust.onnx").status_code == 404
    assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in [j["id"] for j in other.get("/v1/jobs").json()]
    served = http.get(f"/v1/jobs/{job_id}/artifacts/model.robust.onnx")
    assert served.headers["x-content-sha256"] == model_sha == hashlib.sha256(served.content).hexdigest()

    # the gate: a certify job under --fail-under exits 1, bad settings exit 2 with the server's line
    gate = subprocess.run([sys.executable, "-m", "robnet_svc.cli", "submit", str(digits_onnx), "--server",
                           server.url, "--token-file", str(token_file), "--certify", *FAST, "--max-test", "16",
                           "--eps", "0.3", "--fail-under", "1"],
                          env=ENV, capture_output=True, text=True, timeout=DEADLINE)
    assert gate.returncode == 1, gate.stderr
    assert "is under --fail-under 1" in gate.stderr
    bad = subprocess.run([sys.executable, "-m", "robnet_svc.cli", "submit", str(digits_onnx), "--server",
                          server.url, "--token-file", str(token_file), "--eps", "-1", "--wait"],
                         env=ENV, capture_output=True, text=True, timeout=DEADLINE)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "robnet-svc: error: server answered 400: --eps must be > 0, got -1.0"


# --------------------------------------------------------------------------- durability


def test_kill9_mid_training_then_restart_resumes_bit_identically(tmp_path, digits_onnx, tokens):
    """kill -9 the server while a job trains; after a restart it resumes from its checkpoint
    and its certificate equals that of the same job run without interruption."""
    srv = Server(tmp_path / "state", tokens).start()
    try:
        http = srv.client()
        settings = {**FAST_SETTINGS, "epochs": 8}
        first = _submit(http, digits_onnx, settings).raise_for_status().json()["id"]
        second = _submit(http, digits_onnx, settings).raise_for_status().json()["id"]  # queued behind (1 slot)
        _wait(http, first, until=lambda j: (j["progress"] or {}).get("phase") == "train"
              and j["progress"].get("epoch", 0) >= 3, poll=0.02)
        srv.kill9()
        srv.start()
        http = srv.client()
        done = [_wait(http, first), _wait(http, second)]
    finally:
        srv.stop()
    assert [j["state"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    assert done[0]["attempt"] == 2 and done[0]["progress"]["resumed_from_epoch"] >= 2
    assert done[1]["attempt"] == 1 and not done[1]["progress"]["resumed"]
    by_name = [{a["name"]: a["sha256"] for a in j["artifacts"]} for j in done]
    assert by_name[0]["model.robust.onnx"] == by_name[1]["model.robust.onnx"]

    from robnet_svc.report import read_report

    reports = [read_report(tmp_path / "state" / "jobs" / j["id"] / "out" / "certificate.h5") for j in done]
    for section in ("before", "after"):
        a, b = (r.sections[section] for r in reports)
        for field in a.FIELDS:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for key in reports[0].history:
        if key != "seconds":
            np.testing.assert_array_equal(reports[0].history[key], reports[1].history[key])
    assert not (tmp_path / "state" / "jobs" / first / "out" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- no server needed


def test_settings_resolve_exactly_as_the_command_line_does():
    from robnet_svc.cli import harden_cmd
    from robnet_svc.service.jobs import parse_settings

    flags = ["--eps", "0.05", "--order", "1", "--epochs", "3", "--dataset-option", "seed=1", "--mode", "add"]
    with harden_cmd.make_context("harden", [*flags, "input.onnx"]) as ctx:
        expected = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()}
    settings = {"eps": 0.05, "order": "1", "epochs": 3, "dataset_option": ["seed=1"], "--mode": "add"}
    assert parse_settings("harden", settings) == expected


def test_store_refuses_a_newer_schema(tmp_path):
    import sqlite3

    from robnet_svc.errors import RobnetError
    from robnet_svc.service.store import SCHEMA_VERSION, STORE_FILE, JobStore

    store = JobStore(tmp_path)
    job_id = store.add("owner", "harden", {"eps": 0.1}, "0" * 64)
    assert store.claim_next() == (job_id, 1) and store.claim_next() is None
    assert store.requeue_running() == [job_id] and store.claim_next() == (job_id, 2)
    assert not store.finish(job_id, 1, "succeeded")  # a stale attempt's result is ignored
    assert store.finish(job_id, 2, "failed", error="error: x", exit_code=2)
    assert store.get(job_id)["state"] == "failed" and store.get(job_id, owner="other") is None
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RobnetError, match="schema version"):
        JobStore(tmp_path)


def test_a_job_out_of_memory_fails_with_the_command_lines_line(tmp_path, digits_onnx, monkeypatch):
    """A job whose bound pass the machine cannot hold fails as the command line does: exit code
    2 and the same "out of memory (...); lower --batch-size ..." line (not an internal error).
    The job runs in this process (``run_job``, what the worker process calls) so that the pass
    can be made to ask torch's allocator for more than any machine has."""
    import shutil

    import torch

    import robnet_svc.bounds.propagate as propagate
    from robnet_svc.service.store import JobStore
    from robnet_svc.service.worker import run_job

    monkeypatch.setattr(propagate, "forward_pass", lambda *a, **k: torch.empty(1 << 62, dtype=torch.uint8))
    from robnet_svc.service.jobs import parse_settings

    settings = {k: v for k, v in FAST_SETTINGS.items() if k not in ("max-train", "batch-size")}  # harden's
    store = JobStore(tmp_path)
    job_id = store.add("owner", "certify", parse_settings("certify", settings), "0" * 64)  # as the API stores it
    job_dir = tmp_path / "jobs" / job_id
    job_dir.mkdir(parents=True)
    shutil.copyfile(digits_onnx, job_dir / "input.onnx")
    claimed, attempt = store.claim_next()
    assert claimed == job_id
    run_job(store, job_dir, store.get(job_id), attempt, {})
    job = store.get(job_id)
    assert job["state"] == "failed" and job["exit_code"] == 2, job["error"]
    assert job["error"].startswith("error: out of memory (DefaultCPUAllocator: can't allocate memory")
    assert "--cert-batch-size" in job["error"] and not job["artifacts"]
