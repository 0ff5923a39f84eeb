"""``make bench``: every figure of issue 8 in one run -> bench/results.{md,json}.

``python -m bench.run [--quick] [--only datapath,peer,cost,serving,k8s,design]``. ``--quick`` takes
fewer and shorter rounds (a smoke run of the machinery, not figures to quote). A part that
fails is reported as omitted, with the error, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench.agent_cost import CostPlan, measure_cost
from bench.datapath import LOOP_CPU, DatapathPlan, measure_datapath, measure_peer
from bench.design import measure_candidates
from bench.figures import Figure, Omitted, figure_from_dict
from bench.k8s_cache import measure_k8s_cache
from bench.machine import describe_machine
from bench.probing import AgentProbe
from bench.reporting import results_markdown, write_results
from bench.serving_cost import measure_scrape, measure_startup

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
PARTS = ("datapath", "peer", "cost", "serving", "k8s", "design")
BACKENDS_REFUSED = {
    "fentry": "fentry/fexit programs are refused by this kernel (EPERM)",
    "kprobe": "kprobes are not built into this kernel",
}

PREAMBLE = """\
**Backends.** Only the `tracepoint` backend runs on this machine ({refused}), so every
per-backend figure exists for `tracepoint` only.

**Noise.** The machine has {nproc} vCPUs and is shared: load average {load_start} at the
start of the run and {load_end} at the end (other work, e.g. VM-based test tiers, runs on the
same CPUs). Figures are medians of alternating agent-on/agent-off rounds (pairs in
alternating order; tcplife rounds rotate), and spreads are given; a ratio's per-round
min-max shows how far one round can be trusted. Timings are never asserted in tests.

**Agent on / off.** On: the kernel side attached (`open_tracer`) in a separate agent process
that polls every 1 s into the real accountant (built-in metrics, local-mode enricher) and
drains finished sockets' records from the kernel every 0.25 s, as the agent does. Off:
the same process with every hook detached and polling paused (programs loaded, not
attached), so switching costs no recompiling. How each figure was taken follows its table.
"""


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _guarded(
    name: str, figures: list[Figure], omitted: list[Omitted], step: Callable[[], list[Figure]]
) -> None:
    started = time.monotonic()
    try:
        figures += step()
    except Exception as error:
        log.error("%s failed:\n%s", name, traceback.format_exc())
        omitted.append(Omitted(f"{name}.error", name, f"{type(error).__name__}: {error}"))
    log.info("%s took %.0f s", name, time.monotonic() - started)


def run(parts: tuple[str, ...], quick: bool, out_dir: Path) -> tuple[Path, Path]:
    backend = "tracepoint"
    start = datetime.now(UTC)
    load_start = _load()
    figures: list[Figure] = []
    omitted: list[Omitted] = []
    datapath_plan, cost_plan = DatapathPlan(), CostPlan()
    if quick:
        datapath_plan = DatapathPlan(
            pairs=2, send_recv_calls=10_000, unix_calls=20_000, rr_transactions=1_000,
            churn_connections=200, churn_pairs=2, rr_pairs=2, iperf_pairs=1, iperf_seconds=1,
            peer_rounds=1, peer_churn_connections=200, program_time_rounds=2,
            churn_block_connections=100, churn_block_sets=4, churn_sets_per_server=2,
        )  # fmt: skip
        cost_plan = replace(cost_plan, live=(2_000,), polls=2, close_rates=(1_000,),
                            close_seconds=2)  # fmt: skip
    if "datapath" in parts or "peer" in parts:
        with AgentProbe(backend=backend, interval=1.0) as probe:
            if "datapath" in parts:
                _guarded("datapath", figures, omitted,
                         lambda: measure_datapath(probe, datapath_plan, backend))  # fmt: skip
            if "peer" in parts:
                _guarded("peer", figures, omitted,
                         lambda: measure_peer(probe, datapath_plan, backend))  # fmt: skip
    if "cost" in parts:
        _guarded("cost", figures, omitted, lambda: measure_cost(cost_plan, backend))
    if "serving" in parts:
        _guarded("serving", figures, omitted,
                 lambda: measure_scrape() + measure_startup(2 if quick else 5))  # fmt: skip
    if "k8s" in parts:

        def k8s() -> list[Figure]:
            found, gone = measure_k8s_cache(1 if quick else 3)
            omitted.extend(gone)
            return found

        _guarded("k8s", figures, omitted, k8s)
    if "design" in parts:
        _guarded("design", figures, omitted,
                 lambda: measure_candidates(datapath_plan.program_time_rounds,
                                            datapath_plan.send_recv_calls, LOOP_CPU))  # fmt: skip
    for name, reason in BACKENDS_REFUSED.items():
        omitted.append(Omitted(f"datapath.backend_{name}", f"{name} backend", reason))
    machine = {
        **describe_machine(),
        "load_average_start": load_start,
        "load_average_end": _load(),
        "run_seconds": round((datetime.now(UTC) - start).total_seconds()),
        "quick": quick,
    }
    return write_results(
        out_dir, figures, omitted, machine, start.isoformat(timespec="seconds"),
        _preamble(machine),
    )  # fmt: skip


def _preamble(machine: dict[str, object]) -> str:
    return PREAMBLE.format(
        refused="; ".join(f"{k}: {v}" for k, v in BACKENDS_REFUSED.items()),
        nproc=machine.get("nproc"),
        load_start=machine.get("load_average_start"),
        load_end=machine.get("load_average_end"),
    )


def render(out_dir: Path) -> Path:
    """Rewrite results.md from results.json (after a change to the report's layout)."""
    document = json.loads((out_dir / "results.json").read_text())
    figures = [figure_from_dict(k, v) for k, v in document["figures"].items()]
    omitted = [Omitted(k, v["title"], v["reason"]) for k, v in document["omitted"].items()]
    groups = ("datapath", "accuracy", "cost", "peer", "k8s", "design")
    order = {part: i for i, part in enumerate(groups)}
    figures.sort(key=lambda f: order.get(f.group, 99))
    machine = document["machine"]
    md_path = out_dir / "results.md"
    md_path.write_text(
        results_markdown(figures, omitted, machine, document["date"], _preamble(machine))
    )
    return md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="few short rounds (smoke run)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--out", type=Path, default=HERE, help="directory for results.*")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        log.info("wrote %s", render(args.out))
        return 0
    if os.geteuid() != 0:
        parser.error("benchmarks load BPF: run as root (sudo make bench)")
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    json_path, md_path = run(parts, args.quick, args.out)
    log.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
