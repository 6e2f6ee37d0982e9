"""torch.profiler view of one method's hot path, to find what to optimise.

    python -m benchmarks.profile --network DM-small --method rsip-ssip          # training step
    python -m benchmarks.profile --network DM-small --method ssip --what bound  # no_grad bound pass

Prints the top operators by self time (CPU, or CUDA on a GPU) and, with ``--group-by-stack``,
the Python call sites that issue them (``--trace FILE`` writes a Chrome trace as well).
The allocator is tuned as in the benchmark's workers and the command line
(``robnet_svc.bounds.alloc.keep_freed_memory``; ``ROBNET_SVC_MALLOC_TUNING=0`` profiles without
it): untuned, page faults on every large allocation show up as the self time of whichever
autograd node frees or allocates, and the table no longer describes the measured runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import machine, measure
from benchmarks.networks import NETWORKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="DM-small", choices=sorted(NETWORKS))
    parser.add_argument("--method", default="rsip-ssip", choices=measure.TRAIN_METHODS + ("rsip",))
    parser.add_argument("--what", default="step", choices=("step", "bound"),
                        help="a full training step, or one no_grad margin_lower pass")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled repetitions (after 2 warm-up)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: the usable cores; the benchmark's peer runs use 1)")
    parser.add_argument("--group-by-stack", action="store_true", help="attribute ops to Python call sites")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    args = parser.parse_args(argv)

    from robnet_svc.bounds.alloc import keep_freed_memory

    tuned = keep_freed_memory()
    torch.set_num_threads(args.threads or machine.usable_cores())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    setup = measure.build(args.network, args.batch, device)
    if args.what == "step":
        run = measure.train_step(setup, args.method)
    else:
        bounds, net = measure.bound_method(args.method), measure.compiled(setup.model)

        def run() -> None:
            with torch.no_grad():
                bounds.margin_lower(net, setup.perturbation.affine_set(setup.images), setup.labels)

    for _ in range(2):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=args.group_by_stack, record_shapes=True) as prof:
        for _ in range(args.steps):
            with record_function(f"{args.method}:{args.what}"):
                run()
            measure.synchronise(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{machine.describe(device)}; {args.network}, {args.method} {args.what}, batch {args.batch}, "
          f"{args.steps} repetitions, allocator {'tuned' if tuned else 'untuned'}")
    averages = prof.key_averages(group_by_stack_n=6) if args.group_by_stack else prof.key_averages()
    print(averages.table(sort_by=sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
