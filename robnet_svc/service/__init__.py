"""``robnet-svc serve``: an HTTP job API (FastAPI + uvicorn) over the same ``harden`` /
``certify`` code path as the command line, for deployment pipelines and teams sharing a
GPU machine (docs/service.md).

Modules: ``store`` (the SQLite job store, also the queue), ``jobs`` (turning submitted
settings into validated pipeline options, exactly as the CLI does), ``worker`` (the
process that runs one job and reports its progress), ``scheduler`` (worker slots, one per
GPU), ``app`` (the HTTP API) and ``client`` (``robnet-svc submit``: httpx + rich only, no
torch). The server needs the ``service`` extra (fastapi, uvicorn, python-multipart).
"""
