"""The benchmark command (issue 7): every bound method's training step, SSIP floor and
certification throughput on the SPEC §10 networks and an MRI-shaped CNN.

    python -m benchmarks.run                  # full run (~15 min on 2 CPU cores)
    python -m benchmarks.run --quick          # DM-small + MRI-64, fewer repeats (~2 min)
    python -m benchmarks.run --device cuda    # on a GPU: DM-large included
    python -m benchmarks.run --real           # resnet18 and efficientnet_b0 at 3x64x64, batch 32 only

When auto_LiRPA is importable, every measurement of a method with an auto_LiRPA analogue is
followed by the analogue's (``benchmarks.peer``; ``--no-peer`` to skip) and the ratios are
printed beside issue 20's targets; on DM-small and DM-medium each training pair runs
``--rounds`` times, alternating, and each side reports its median.

When torch can compile here (``--no-compile`` to skip), ``ssip`` and ``rsip-ssip`` are also
timed with ``harden --compile``'s fused kernels (rows ``ssip --compile`` ...; in the same
rounds as their peer pairs) and the SSIP pass with them (floor row ``DM-small --compile`` ...).

Prints the table and every target as a ratio with PASS/MISS, writes the results JSON
(``--out``) and rewrites this device's results section of ``docs/benchmarks.md`` (``--docs``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import machine, peer, report
from benchmarks.measure import CERT_METHODS, COMPILABLE, COMPILED, STANDARD, TRAIN_METHODS
from benchmarks.networks import NETWORKS, REAL_NETWORKS
from benchmarks.worker import REPO, Job, run_here, run_isolated

DEFAULT_NETWORKS = ("DM-small", "DM-medium", "MRI-32", "MRI-64")
QUICK_NETWORKS = ("DM-small", "MRI-64")
MEM_CHECK_NETWORK = "MRI-64"  # issue 7: the MRI-shaped net at batch 32 must fit 8 GiB
# Full CROWN (rsip) back-substitutes every unstable neuron of every layer: O(neurons · forward),
# so it is timed once on a moderate batch (issue 20: DM-medium at batch >= 8 within 8 GiB).
RSIP_CERT_BATCH = {"DM-small": 8, "MRI-32": 16, "MRI-64": 2, "DM-medium": 8, "DM-large": 1, "tiny": 2}
REAL_BATCH = 32
#: issue 20's training-step targets are set on these networks: their pairs run ``--rounds`` times
ROUNDS_NETWORKS = ("DM-small", "DM-medium")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="DM-small and MRI-64, 1 warm-up + 2 timed steps, no full-CROWN certification; "
                        "writes results.quick.json")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), help="networks to run")
    parser.add_argument("--large", action="store_true", help="include DM-large (default only on a GPU)")
    parser.add_argument("--real", action="store_true",
                        help=f"only the real architectures ({', '.join(REAL_NETWORKS)} at 3x64x64): training "
                        f"steps at batch {REAL_BATCH}, 1 warm-up + 1 timed step, no certification")
    parser.add_argument("--no-peer", action="store_true", help="skip the auto_LiRPA analogues even when importable")
    parser.add_argument("--no-compile", action="store_true",
                        help=f"skip the {' and '.join(COMPILABLE)} steps with harden --compile's fused kernels")
    parser.add_argument("--rounds", type=int, default=3,
                        help="peer mode: each training pair (ours, auto_LiRPA's analogue) on "
                        f"{' and '.join(ROUNDS_NETWORKS)} runs this many times, alternating, each in a fresh process; "
                        "the median per side is reported (default 3: a process's speed on a shared machine "
                        "drifts by up to a third)")
    parser.add_argument("--methods", nargs="+", choices=TRAIN_METHODS, default=list(TRAIN_METHODS))
    parser.add_argument("--cert-methods", nargs="*", choices=CERT_METHODS,
                        help="certification methods (default rsip-ssip and rsip; --quick: rsip-ssip)")
    parser.add_argument("--batch", type=int, help=f"training batch size (default 64, issue 7; --real {REAL_BATCH})")
    parser.add_argument("--mem-batch", type=int, default=32,
                        help="second batch size for the MRI net's memory check (0: skip)")
    parser.add_argument("--cert-batch", type=int, default=64, help="certification batch for rsip-ssip")
    parser.add_argument("--rsip-cert-batch", type=int,
                        help="certification batch for full CROWN (rsip), timed once without warm-up: "
                        "it is the expensive one (default per network: " +
                        ", ".join(f"{k} {v}" for k, v in RSIP_CERT_BATCH.items()) + ")")
    parser.add_argument("--rsip-timeout", type=float, default=150.0,
                        help="seconds before full-CROWN certification of a network is declared infeasible")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; --quick 1)")
    parser.add_argument("--repeats", type=int, help="timed steps, median reported (default 5; --quick 2)")
    parser.add_argument("--threads", type=int, default=machine.usable_cores(), help="torch threads")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a configuration is "
                        "declared infeasible (isolated runs only)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="measure in this process (faster start; CPU peak memory then is cumulative)")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results.json, "
                        "--quick: benchmarks/results.quick.json)")
    parser.add_argument("--docs", type=Path, help="markdown file whose results section is rewritten "
                        "(default docs/benchmarks.md for a full run; --quick, --real, --networks: none)")
    args = parser.parse_args(argv)
    args.compile = not args.no_compile  # main turns it off where torch cannot compile
    if args.real:
        args.networks = args.networks or list(REAL_NETWORKS)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 1 if args.repeats is None else args.repeats
        args.cert_methods, args.mem_batch = [], 0
        args.out = args.out or REPO / "benchmarks" / "results.real.json"
    args.batch = args.batch or (REAL_BATCH if args.real else 64)
    args.warmup = (1 if args.quick else 2) if args.warmup is None else args.warmup
    if args.cert_methods is None:
        args.cert_methods = ["rsip-ssip"] if args.quick else list(CERT_METHODS)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if args.out is None:
        args.out = REPO / "benchmarks" / ("results.quick.json" if args.quick else "results.json")
    if args.docs is None and not (args.quick or args.real or args.networks):  # only a full run replaces them
        args.docs = REPO / "docs" / "benchmarks.md"
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def plan(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[Job]]:
    """The networks and every measurement of the run, in the order they are taken."""
    if args.networks:
        networks = list(args.networks)
    else:
        networks = list(QUICK_NETWORKS if args.quick else DEFAULT_NETWORKS)
        if args.large or device.type == "cuda":
            networks.append("DM-large")
    make = lambda kind, net, method, batch: Job(kind, net, method, batch, str(device),  # noqa: E731
                                                args.warmup, args.repeats, args.threads)
    methods = [STANDARD] + [m for m in args.methods if m != STANDARD]
    with_peer = args.peer
    jobs = []

    def add(job: Job) -> None:
        """Ours, then (interleaved) the auto_LiRPA analogue of the same job, then ours with the
        fused kernels (when compiling and the method has an SSIP pass)."""
        fused = ([replace(job, method=job.method + COMPILED)] if args.compile and job.kind == "train"
                 and job.method in COMPILABLE else [])
        if not (with_peer and peer.ANALOGUES.get(job.method, (None, None))[1] == job.kind):
            jobs.extend([job, *fused])
            return
        rounds = max(1, args.rounds) if job.kind == "train" and job.network in ROUNDS_NETWORKS else 1
        jobs.extend([job, replace(job, kind=f"peer-{job.kind}"), *fused] * rounds)

    for net in networks:
        for m in methods:
            add(make("train", net, m, args.batch))
        if args.mem_batch and args.mem_batch != args.batch and net == MEM_CHECK_NETWORK:
            jobs += [make("train", net, m, args.mem_batch) for m in methods]
        if not args.real and ("ssip" in args.methods or "rsip-ssip" in args.methods):
            jobs.append(make("floor", net, "ssip", args.batch))
            if args.compile:
                jobs.append(make("floor", net, "ssip" + COMPILED, args.batch))
        for m in args.cert_methods:
            if m == "rsip":
                batch = args.rsip_cert_batch or RSIP_CERT_BATCH.get(net, 1)
                add(Job("cert", net, m, batch, str(device), 0, 1, args.threads))
            else:
                add(make("cert", net, m, args.cert_batch))
    return networks, jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    description = machine.describe(device)
    missing = peer.unavailable()
    args.peer = not args.no_peer and missing is None
    no_compiler = None if device.type == "cuda" or shutil.which(os.environ.get("CXX", "g++")) else \
        "no C++ compiler: the --compile steps are skipped"
    args.compile = args.compile and no_compiler is None
    networks, jobs = plan(args, device)
    load_start = os.getloadavg()[0]
    print(f"machine: {description}; load average {load_start:.1f}", flush=True)
    print("peer mode: " + ("auto_LiRPA analogues interleaved" if args.peer else "off (--no-peer)" if args.no_peer
                           else missing), flush=True)
    print("compiled kernels: " + ("timed too (ssip and rsip-ssip with --compile)" if args.compile
                                  else "off (--no-compile)" if args.no_compile else no_compiler), flush=True)
    print(f"{len(jobs)} measurements on {', '.join(networks)}; batch {args.batch}, "
          f"{args.warmup} warm-up + {args.repeats} timed steps each", flush=True)

    train, floor, cert, peers = {}, {}, {}, {}
    repeated: dict[tuple, list[dict]] = {}  # training pairs run in several rounds: every round's result
    started = time.perf_counter()
    for index, job in enumerate(jobs, 1):
        t0 = time.perf_counter()
        timeout = args.rsip_timeout if job.method == "rsip" else args.timeout
        got = run_here_safely(job) if args.no_isolate else run_isolated(job, timeout)
        if job.kind.startswith("peer-"):
            key = (job.kind[5:], job.network, job.method, job.batch)
            peers[key] = combine_rounds(repeated.setdefault(("peer",) + key, []), got)
        elif job.kind == "train":
            key = (job.network, job.method, job.batch)
            train[key] = combine_rounds(repeated.setdefault(("ours",) + key, []), got)
        elif job.kind == "floor":
            floor[job.network + job.method.removeprefix("ssip")] = got  # "DM-small", "DM-small --compile"
        else:
            cert[(job.network, job.method)] = {"batch": job.batch, **got}
        summary = got.get("error") or ", ".join(f"{k}={v:.4g}" for k, v in got.items() if isinstance(v, float))
        print(f"[{index}/{len(jobs)}] {job.label()}: {summary} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    results = report.build_results(description, train, floor, cert, args.batch)
    verdicts = report.targets(train, floor, args.batch, device.type, args.mem_batch)
    verdicts += report.peer_targets(train, cert, peers)
    verdicts += report.rsip_targets(cert)
    elapsed = time.perf_counter() - started
    args.load = (load_start, os.getloadavg()[0])  # other processes on the machine skew absolute times
    print()
    print(report.table(train, args.batch))
    print()
    print(report.extra_tables(floor, cert))
    print()
    print("targets (issues 7 and 20), each a ratio measured in this run:")
    for target in verdicts:
        print("  " + target.line())
    print(f"\n{len(jobs)} measurements in {elapsed:.0f} s; results: {args.out}")

    report.write_json(args.out, results)
    if args.docs:
        report.rewrite_docs(args.docs, device.type, docs_section(args, device, description, train,
                                                                 floor, cert, verdicts, elapsed))
        print(f"docs: {args.docs}")
    return 0


def combine_rounds(seen: list[dict], got: dict) -> dict:
    """Add one round's result of a configuration to ``seen`` and return the combined result: the
    median of each timing over the rounds that succeeded (each already the median of its
    process's steps), the largest peak memory, the count in ``rounds`` and every round's CPU
    seconds in ``cpu_s_rounds``; a round that failed counts only when all did."""
    seen.append(got)
    ok = [r for r in seen if "error" not in r]
    if len(seen) == 1 or not ok:
        return got
    out = dict(ok[-1])
    for key in ("step_s", "cpu_s"):
        values = [r[key] for r in ok if key in r]
        if values:
            out[key] = statistics.median(values)
    memory = [r["peak_mem_mb"] for r in ok if "peak_mem_mb" in r]
    if memory:
        out["peak_mem_mb"] = max(memory)
    out["rounds"] = len(ok)
    out["cpu_s_rounds"] = [r.get("cpu_s") for r in ok]
    return out


def run_here_safely(job: Job) -> dict:
    try:
        return run_here(job)
    except Exception as exc:  # one failed configuration must not lose the whole run
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def docs_section(args, device, description, train, floor, cert, verdicts, elapsed) -> str:
    """The markdown that replaces this device's results section of the docs."""
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python -m benchmarks.run"
    kind = "GPU" if device.type == "cuda" else "CPU"
    return "\n".join([
        f"### Results on {kind}",
        "",
        f"Machine: {description}; 1-min load average {args.load[0]:.1f} at the start, {args.load[1]:.1f} "
        f"at the end (anything above ~0.2 means other processes shared the cores).  ",
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min); batch {args.batch}, "
        f"median of {args.repeats} steps after {args.warmup} warm-up; peak memory = "
        + ("`torch.cuda.max_memory_allocated`." if device.type == "cuda"
           else "RSS high-water mark of a fresh process per configuration (includes ~0.3 GB of torch itself)."),
        "",
        "Training step (forward + bounds + hinge loss + backward + Adam):",
        "",
        report.table(train, args.batch),
        "",
        "SSIP floor (no_grad, paper Theorem 3) and certification throughput (no_grad; clean forward + margin bounds):",
        "",
        report.extra_tables(floor, cert),
        "",
        "Targets (issues 7 and 20):",
        "",
        "```",
        *(t.line() for t in verdicts),
        "```",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
