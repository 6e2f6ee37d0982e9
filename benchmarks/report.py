"""Turn measurements into the issue-7 results JSON, the target verdicts and the tables.

Results JSON (exactly the schema of issue 7)::

    {"machine": str,
     "rows": [{"network", "method", "step_s", "ratio_to_standard", "peak_mem_mb"}],
     "ssip_floor_ratio": {network: float},
     "cert_samples_per_s": {network: {method: float}}}

Rows at a second batch size (the MRI net's 8 GiB check at batch 32) carry the batch in the
network name, ``"MRI-64 (batch 32)"``. A configuration that failed (time-out, out of memory)
keeps its row with ``null`` numbers; a certification method that was infeasible is left out
of ``cert_samples_per_s`` and named in the notes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import COMPILED, STANDARD
from robnet_svc.atomic import atomic_path

GIB8_MB = 8 * 1024
# Paper per-epoch ratios rsip-ssip / standard on an RTX 3090 (SPEC §10: 138/29, 273/30 upper ends).
PAPER_GPU_RATIO = {"DM-small": 4.8, "DM-medium": 9.1}
# Issue 7: auto_LiRPA 0.7.1 on a 2-core machine, batch 64, k = 16, minus ~20 % (seconds per step).
AUTOLIRPA_TARGET_S = {("DM-small", "rsip-ibp"): 0.19, ("DM-medium", "rsip-ibp"): 0.92,
                      ("DM-small", "rsip-ssip"): 0.46, ("DM-medium", "rsip-ssip"): 3.4}


def row_name(network: str, batch: int, main_batch: int) -> str:
    return network if batch == main_batch else f"{network} (batch {batch})"


@dataclass(frozen=True)
class Target:
    """One target of issue 7 as a measured ratio: PASS when ``value <= limit``; INFO when no limit.

    ``cpu_value`` is the same ratio in process CPU time, shown beside it: on a shared machine
    other processes inflate wall times, and the CPU-time ratio shows what the code itself costs.
    """

    name: str
    value: float | None
    limit: float | None
    note: str = ""
    cpu_value: float | None = None

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "N/A"
        if self.limit is None:
            return "INFO"
        return "PASS" if self.value <= self.limit else "MISS"

    def line(self) -> str:
        value = "-" if self.value is None else f"{self.value:.2f}"
        if self.cpu_value is not None:
            value += f" (CPU time {self.cpu_value:.2f})"
        limit = "" if self.limit is None else f", target <= {self.limit:.2f}"
        note = f"  [{self.note}]" if self.note else ""
        return f"{self.verdict:4}  {self.name}: {value}{limit}{note}"


def build_results(machine: str, train: dict, floor: dict, cert: dict, main_batch: int) -> dict:
    """Issue-7 JSON from ``train[(network, method, batch)]``, ``floor[network]``, ``cert[(network, method)]``."""
    rows = []
    for (network, method, batch), got in train.items():
        standard = train.get((network, STANDARD, batch), {}).get("step_s")
        step = got.get("step_s")
        rows.append({
            "network": row_name(network, batch, main_batch),
            "method": method,
            "step_s": step,
            "ratio_to_standard": step / standard if step is not None and standard else None,
            "peak_mem_mb": got.get("peak_mem_mb"),
        })
    floor_ratio = {net: got["ratio"] for net, got in floor.items() if "ratio" in got}
    cert_rate: dict[str, dict[str, float]] = {}
    for (network, method), got in cert.items():
        if "samples_per_s" in got:
            cert_rate.setdefault(network, {})[method] = got["samples_per_s"]
    return {"machine": machine, "rows": rows, "ssip_floor_ratio": floor_ratio, "cert_samples_per_s": cert_rate}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


#: SSIP pass ÷ its floor of 2(k+1)·B forward images: issue 20's target (issue 7 first asked 1.3)
SSIP_FLOOR_TARGET, SSIP_FLOOR_TARGET_ISSUE7 = 1.5, 1.3


def targets(train: dict, floor: dict, main_batch: int, device_type: str, mem_batch: int) -> list[Target]:
    """Every target of issue 7 that this run measured, as ratios (wall time; CPU time beside)."""

    def step(network: str, method: str, key: str = "step_s") -> float | None:
        return train.get((network, method, main_batch), {}).get(key)

    out = [Target(f"SSIP pass / floor [{net}]", got.get("ratio"), SSIP_FLOOR_TARGET,
                  f"issue 20; issue 7 asked <= {SSIP_FLOOR_TARGET_ISSUE7}", cpu_value=got.get("cpu_ratio"))
           for net, got in floor.items()]
    for net in ("DM-small", "DM-medium"):
        if (net, "rsip-ssip", main_batch) in train or (net, "rsip-ibp", main_batch) in train:
            out.append(Target(f"rsip-ssip step / rsip-ibp step [{net}]",
                              _ratio(step(net, "rsip-ssip"), step(net, "rsip-ibp")), 2.0,
                              cpu_value=_ratio(step(net, "rsip-ssip", "cpu_s"), step(net, "rsip-ibp", "cpu_s"))))
    for net, paper in PAPER_GPU_RATIO.items():
        value = _ratio(step(net, "rsip-ssip"), step(net, STANDARD))
        if value is None:
            continue
        cpu = _ratio(step(net, "rsip-ssip", "cpu_s"), step(net, STANDARD, "cpu_s"))
        if device_type == "cuda":
            out.append(Target(f"rsip-ssip step / standard step [{net}]", value, paper,
                              "paper per-epoch ratio, RTX 3090", cpu))
        else:
            out.append(Target(f"rsip-ssip step / standard step [{net}]", value, None,
                              f"CPU: report only, the floor alone is ~2(k+1) forwards; paper GPU {paper}x", cpu))
    for (net, method), limit_s in AUTOLIRPA_TARGET_S.items():
        measured = step(net, method)
        if measured is not None:
            note = "auto_LiRPA measured on a 2-core CPU" + ("; this run is on a GPU" if device_type == "cuda" else "")
            out.append(Target(f"{method} step / {limit_s} s (auto_LiRPA-derived) [{net}]", measured / limit_s, 1.0,
                              note, _ratio(step(net, method, "cpu_s"), limit_s)))
    for (net, method, batch), got in train.items():
        if batch == mem_batch and net.startswith("MRI"):
            mem = got.get("peak_mem_mb")
            out.append(Target(f"peak memory / 8 GiB [{net} batch {mem_batch}, {method}]",
                              None if mem is None else mem / GIB8_MB, 1.0))
    return out


def peer_targets(train: dict, cert: dict, peers: dict) -> list[Target]:
    """Issue 20: ours ÷ auto_LiRPA's analogue, measured in this run (``peers[(kind, network,
    method, batch)]``): training steps in seconds, certification in seconds per sample."""
    from benchmarks.peer import ANALOGUES, TARGETS

    out = []
    for (kind, network, method, batch), got in peers.items():
        # training: our step as it runs by default, then with the fused kernels (--compile) if timed
        variants = [method] + ([method + COMPILED] if (network, method + COMPILED, batch) in train else [])
        for ours_name in variants if kind == "train" else [method]:
            name = f"{ours_name} / auto_LiRPA {ANALOGUES[method][0]} [{network}, batch {batch}]"
            if kind == "train":
                ours = train.get((network, ours_name, batch), {})
                value = _ratio(ours.get("step_s"), got.get("step_s"))
                cpu = _ratio(ours.get("cpu_s"), got.get("cpu_s"))
            else:
                ours = cert.get((network, method), {})
                value = _ratio(got.get("samples_per_s"), ours.get("samples_per_s"))  # time ratio
                cpu = _ratio(ours.get("cpu_s"), got.get("cpu_s"))
            note = got.get("error", "")
            if "cpu_s_rounds" in got and "cpu_s_rounds" in ours:  # several alternating rounds: each one's CPU s
                note = (f"median of {got['rounds']} rounds; CPU s ours "
                        + "/".join(f"{v:.3g}" for v in ours["cpu_s_rounds"]) + ", auto_LiRPA "
                        + "/".join(f"{v:.3g}" for v in got["cpu_s_rounds"]))
            if "max_abs_diff" in got:  # the same bound on both sides: how far apart the margins came out
                note = (f"margin bounds differ by at most {got['max_abs_diff']:.1e} (mean "
                        f"{got['mean_margin_ours']:.4g} ours, {got['mean_margin_peer']:.4g} auto_LiRPA)")
            out.append(Target(name, value, TARGETS[method], note, cpu))
    return out


#: issue 20, auto_LiRPA 0.7.1 CROWN on this CPU (one thread): seconds per 100 MRI-32 samples
AUTOLIRPA_CROWN_MRI32_S = (4.6, 12.4)


def rsip_targets(cert: dict) -> list[Target]:
    """Issue 20's full-CROWN facts: seconds per 100 MRI-32 samples against auto_LiRPA's figure
    from the issue (another run: INFO), and DM-medium certifiable at batch >= 8 within 8 GiB."""
    out = []
    got = cert.get(("MRI-32", "rsip"), {})
    if "samples_per_s" in got:
        low, high = AUTOLIRPA_CROWN_MRI32_S
        cpu = 100 * got["cpu_s"] / got["batch"] if "cpu_s" in got else None
        out.append(Target("rsip s per 100 samples [MRI-32]", 100 / got["samples_per_s"], None,
                          f"auto_LiRPA CROWN {low}-{high} s in issue 20's run, not this one", cpu))
    got = cert.get(("DM-medium", "rsip"), {})
    if got:
        mem = got.get("peak_mem_mb")
        note = f"batch {got.get('batch')}" + ("" if got.get("batch", 0) >= 8 else ", below the target's 8")
        out.append(Target("rsip peak memory / 8 GiB [DM-medium]", None if mem is None else mem / GIB8_MB, 1.0,
                          got.get("error", note)))
    return out


def table(train: dict, main_batch: int) -> str:
    """Markdown table of the training steps (one row per network × method × batch)."""
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| network | method | step (s) | × standard | CPU s / step | × standard (CPU) | peak mem (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (network, method, batch), got in train.items():
        standard = train.get((network, STANDARD, batch), {})
        lines.append(
            f"| {row_name(network, batch, main_batch)} | {method} | {fmt(got.get('step_s'), '.3f')} | "
            f"{fmt(_ratio(got.get('step_s'), standard.get('step_s')), '.1f')} | {fmt(got.get('cpu_s'), '.3f')} | "
            f"{fmt(_ratio(got.get('cpu_s'), standard.get('cpu_s')), '.1f')} | {fmt(got.get('peak_mem_mb'), '.0f')} |"
            + (f" {got['error']}" if "error" in got else ""))
    return "\n".join(lines)


def extra_tables(floor: dict, cert: dict) -> str:
    """Markdown tables of the SSIP floor and the certification throughput (with batches used)."""
    lines = ["| network | SSIP pass (s) | forward of 2(k+1)·B images (s), NCHW / channels-last | ratio to the faster "
             "| ratio in CPU time |",
             "|---|---:|---:|---:|---:|"]
    for net, got in floor.items():
        if "ratio" in got:
            both = " / ".join("—" if got.get(f"floor_{name}_s") is None else f"{got[f'floor_{name}_s']:.3f}"
                              for name in ("nchw", "channels_last"))
            lines.append(f"| {net} | {got['ssip_pass_s']:.3f} | {both} | {got['ratio']:.2f} | "
                         f"{got['cpu_ratio']:.2f} |")
        else:
            lines.append(f"| {net} | — | — | {got.get('error', 'failed')} | — |")
    lines += ["", "| network | method | batch | samples/s | CPU s / sample | peak mem (MiB) |",
              "|---|---|---:|---:|---:|---:|"]
    for (net, method), got in cert.items():
        if "samples_per_s" in got:
            cpu = f"{got['cpu_s'] / got['batch']:.3f}" if "cpu_s" in got else "—"
            lines.append(f"| {net} | {method} | {got['batch']} | {got['samples_per_s']:.2f} | {cpu} | "
                         f"{got['peak_mem_mb']:.0f} |")
        else:
            lines.append(f"| {net} | {method} | {got.get('batch', '—')} | infeasible: {got.get('error', '?')} | — | — |")
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Write atomically (temp name in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def rewrite_docs(path: Path, section_key: str, body: str) -> None:
    """Replace the text between ``<!-- results:KEY -->`` and ``<!-- /results:KEY -->`` in ``path``
    (appended when the markers are missing), so a GPU run adds its table beside the CPU one."""
    start, end = f"<!-- results:{section_key} -->", f"<!-- /results:{section_key} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

