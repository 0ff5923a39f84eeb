"""Writes bench/results.json (one stable key per figure) and bench/results.md (tables).

``results.json``::

    {"machine": {"nproc": 2, "memory_mib": 24105, "kernel": "6.18.44", ...},
     "date": "2026-05-10T12:00:00+00:00",
     "figures": {"datapath.send_recv_ns_per_call.tracepoint":
                    {"title": ..., "unit": "ns", "on": {"median": ..., "min": ..., ...},
                     "off": {...}, "added": {...}, "target": {"met": false, ...}, ...}},
     "omitted": {"k8s.cache_rss_mib": "why it is not here"}}
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.figures import Figure, Omitted
from bench.stats import Spread

GROUP_TITLES = {
    "datapath": "1. Data path: agent on vs off",
    "accuracy": "2. Accuracy: counted bytes vs bytes moved vs tcp_info",
    "cost": "3. Agent cost",
    "peer": "4. The peer: bcc's tcplife",
    "k8s": "5. Kubernetes cache",
    "design": "6. Design candidates for the per-call cost (the kernel's count)",
}


def number(value: float) -> str:
    """Three significant digits, no exponent for everyday sizes.

    ``1234.5`` -> ``"1234"``; ``0.98765`` -> ``"0.988"``; ``12.345`` -> ``"12.3"``;
    ``nan`` -> ``"n/a"``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _range(spread: Spread | None) -> str:
    if spread is None:
        return ""
    return f"{number(spread.min)} to {number(spread.max)}"


NOISY_SPREAD = 1.3  # per-round max/min of a ratio beyond which one run cannot judge a target


def too_noisy(figure: Figure) -> bool:
    """Whether a ratio's rounds disagree too much to judge: rounds 0.6 to 1.8 -> True."""
    ratio = figure.ratio
    if ratio is None or ratio.min <= 0 or math.isnan(ratio.min):
        return False
    return ratio.max / ratio.min > NOISY_SPREAD


def _status(figure: Figure) -> str:
    verdict = figure.verdict()
    if verdict is None or figure.target is None:
        return ""
    met, by = verdict
    noisy = " (rounds too spread to judge: re-run on a quiet machine)" if too_noisy(figure) else ""
    if met:
        return "met" + noisy
    judged = figure.judged()
    assert judged is not None
    unit = "" if figure.target.of == "ratio" else f" {figure.unit}"
    relative = ""
    if figure.target.bound and figure.target.op == "<=":
        relative = f", {figure.target.point(judged) / figure.target.bound:.2f}x the bound"
    return f"**missed by {number(by)}{unit}**{relative}{noisy}"


def _first(value: object) -> float | None:
    if isinstance(value, list):
        return float(value[len(value) // 2]) if value else None
    return float(value) if isinstance(value, int | float) else None


def _function(profile_row: str) -> str:
    """``"  200024  2.344  0.000  3.174  0.000 /x/agent/accounting.py:216(_count)"`` ->
    ``"accounting.py:216(_count) 2.34 s"`` (own time)."""
    fields = profile_row.split(None, 5)
    where = fields[5].rsplit("/", 1)[-1] if len(fields) == 6 else profile_row.strip()
    own = fields[1] if len(fields) == 6 else "?"
    return f"{where} {own} s"


def _blocks(details: Mapping[str, Any], mode: str) -> str:
    """A churn-blocks mode's mean and 95 % interval from the churn figure's details:
    ``{"blocks_lean_mean": 0.951, "blocks_lean_low": 0.94, "blocks_lean_high": 0.962}``,
    ``"lean"`` -> ``"0.951 (0.940-0.962)"``."""
    mean, low, high = (details[f"blocks_{mode}_{end}"] for end in ("mean", "low", "high"))
    return f"{mean:.3f} ({low:.3f}-{high:.3f})"


def why(figure: Figure) -> str:
    """What this run's own data says about a figure (for a missed target).

    RSS figures -> the anonymous/file-backed split; start-to-ready -> its phases; polls ->
    the three functions with the most own time in the profiled poll; noisy ratios -> so.
    """
    d = figure.details
    if d.get("mismatches"):
        shown = "; ".join(
            f"round {m['round']}: {m['check']} expected {m['expected']}, got {m['got']}"
            for m in d["mismatches"][:3]
        )
        return f"{len(d['mismatches'])} check(s) not exact: {shown}"
    if "empty_program_added_ns" in d and "own_work_ns" in d:
        counted = (
            f"; by the kernel's own count (BPF_ENABLE_STATS, less its clock reads) the "
            f"programs run {d['bpf_ns_per_call']:.0f} ns per call"
            if "bpf_ns_per_call" in d
            else ""
        )
        return (
            f"an empty program on the same tracepoints adds {d['empty_program_added_ns']:.0f} "
            "ns here (the tracepoint's dispatch, with Spectre/SRSO mitigations); tcpacct's own "
            f"work {d['own_work_ns']:.0f} ns over it (the socket's slot found by inlined array "
            "lookups, one atomic add), both from rotating triplets of rounds (off, empty "
            "program, tcpacct)" + counted
        )
    if "hooks_only_ratio" in d and "agent_over_hooks" in d:
        split = (
            f"in rotating triplets of rounds, the kernel hooks alone (maps emptied, nothing "
            f"decoded) keep {d['hooks_only_ratio']:.3f} of agent-off, and the whole agent "
            f"{d['agent_over_hooks']:.3f} of hooks-only"
        )
        if "blocks_mean" in d:
            split += (
                f"; in {d['blocks_pairs']} short alternating blocks the whole agent keeps "
                f"{d['blocks_mean']:.3f} (95 % interval {d['blocks_low']:.3f}-"
                f"{d['blocks_high']:.3f})"
            )
            if "blocks_empty_mean" in d:
                split += f" and an empty program on its hooks {_blocks(d, 'empty')}"
            if "blocks_empty_data_mean" in d:
                split += f", on the data tracepoints alone {_blocks(d, 'empty_data')}"
            if "blocks_lean_mean" in d and "blocks_empty_lean_mean" in d:
                split += (
                    "; without its state-change hooks (entries made at the first byte) the "
                    f"hooks keep {_blocks(d, 'lean')}, an empty program where that variant "
                    f"attaches {_blocks(d, 'empty_lean')}"
                )
            if "blocks_no_twins_mean" in d and "blocks_no_twins_over_hooks_mean" in d:
                split += (
                    "; without the lifecycle handlers' recursion twins the hooks keep "
                    f"{_blocks(d, 'no_twins')}, {_blocks(d, 'no_twins_over_hooks')} of the "
                    "whole hooks'"
                )
            if "blocks_off_again_mean" in d:
                split += f"; nothing attached, twice, reads {_blocks(d, 'off_again')}"
        kernel = _churn_kernel_budget(figure)
        if kernel:
            return f"{kernel}; {split}{_beyond_the_count(figure)}"
        return (
            f"{split}: the kernel side and the agent's user space (decoding, naming and "
            "accounting every finished socket) both cost here"
        )
    if "rss_anon_mib" in d and "rss_file_mib" in d:
        anon, mapped = _first(d["rss_anon_mib"]), _first(d["rss_file_mib"])
        if anon is not None and mapped is not None:
            return (
                f"RssAnon {anon:.0f} MiB (the agent's heap) + RssFile {mapped:.0f} MiB "
                "(mapped files: the interpreter and its libraries)"
            )
    if "http_answering_s" in d and "attached_s" in d:
        http, attached = _first(sorted(d["http_answering_s"])), _first(sorted(d["attached_s"]))
        if http is not None and attached is not None and figure.value is not None:
            return (
                f"interpreter + imports until HTTP answers {http:.2f} s, BPF load + attach "
                f"{attached - http:.2f} s, first poll {figure.value.median - attached:.2f} s "
                "(medians)"
            )
    profile = d.get("profile_top")
    if profile:
        tracer, accountant = d.get("tracer_poll_ms"), d.get("accountant_apply_ms")
        split = (
            f"reading the kernel (tracer.poll) {statistics.median(tracer):.0f} ms, "
            f"accounting (accountant.apply) {statistics.median(accountant):.0f} ms (medians); "
            if tracer and accountant
            else ""
        )
        return (
            split
            + "most own time in one profiled poll: "
            + "; ".join(_function(row) for row in profile[:3])
        )
    interval = _ratio_interval(figure)
    if too_noisy(figure):
        return "per-round ratios disagree (shared, loaded machine): not a verdict" + (
            f"; {interval}" if interval else ""
        )
    return interval


def _ratio_interval(figure: Figure) -> str:
    """A ratio target's pairs as an interval, and whether the bound lies in it: ``"the 16
    pairs' geometric mean 0.959, 95 % interval 0.920-1.000, holds the bound 0.99"``."""
    interval, target = figure.details.get("interval_95"), figure.target
    if not interval or target is None or target.of != "ratio":
        return ""
    inside = interval["low"] <= target.bound <= interval["high"]
    return (
        f"the {interval['pairs']} pairs' geometric mean {interval['mean']:.3f}, 95 % interval "
        f"{interval['low']:.3f}-{interval['high']:.3f}, "
        + ("holds the bound" if inside else "lies wholly on one side of the bound")
        + f" {target.bound}"
    )


def _churn_kernel_us(figure: Figure) -> float | None:
    """The kernel's count of tcpacct's programs per churned connection plus their dispatch
    (runs x the empty program's added ns, 0 when that came out negative), in us."""
    d = figure.details
    needed = ("bpf_us_per_connection", "program_runs_per_connection", "dispatch_ns_per_run")
    if not all(k in d for k in needed):
        return None
    dispatch_ns = max(0.0, d["dispatch_ns_per_run"])
    return d["bpf_us_per_connection"] + d["program_runs_per_connection"] * dispatch_ns / 1000


def _beyond_the_count(figure: Figure) -> str:
    """What the hooks-only rounds lost per connection against what the kernel counts:
    ``"; the hooks-only rounds lost 9.9 us a connection, 1.1x the programs' counted run
    time and dispatch"`` (100 us a connection agent-off, hooks-only 0.91, 9.0 us counted),
    and, where measured, the triplets' added wall and CPU busy time per connection."""
    kernel_us = _churn_kernel_us(figure)
    hooks = figure.details.get("hooks_only_ratio")
    if not kernel_us or not hooks or figure.off is None or not figure.off.median:
        return ""
    lost_us = 1e6 / figure.off.median * (1 / hooks - 1)
    text = (
        f"; the hooks-only rounds lost {lost_us:.1f} us a connection, "
        f"{lost_us / kernel_us:.1f}x the programs' counted run time and dispatch"
    )
    wall, busy = (figure.details.get(k) for k in ("hooks_added_wall_us", "hooks_added_busy_us"))
    if wall is not None and busy is not None:
        text += (
            f"; per triplet, their wall time grew {wall:.1f} us a connection and the two "
            f"CPUs' busy time {busy:.1f} us (less their idle residency: both ends, softirqs, "
            "the probe)"
        )
    return text


def _churn_kernel_budget(figure: Figure) -> str:
    """The churn's kernel side from the kernel's own counters: what a connection costs in
    tcpacct's programs and their dispatch, against what the target ratio of agent-off
    would allow."""
    d = figure.details
    target = figure.target
    kernel_us = _churn_kernel_us(figure)
    if target is None or figure.off is None or not figure.off.median or kernel_us is None:
        return ""
    runs = d["program_runs_per_connection"]
    dispatch_ns = d["dispatch_ns_per_run"]
    if dispatch_ns > 0:
        dispatch = f"{dispatch_ns:.0f} ns per run, the empty program's"
    else:  # the empty-program ratio came out at or below zero: noise swamped it
        dispatch = f"the empty program's {dispatch_ns:.0f} ns per run is noise, 0 taken"
    dispatch_us = kernel_us - d["bpf_us_per_connection"]
    off_us = 1e6 / figure.off.median
    at_most = off_us / (off_us + kernel_us)
    budget_us = off_us * (1 / target.bound - 1)
    return (
        f"per connection the kernel runs tcpacct's programs {runs:.0f} times (both ends, "
        f"lifecycle twins included): {d['bpf_us_per_connection']:.1f} us inside them (the "
        f"kernel's count) + ~{dispatch_us:.1f} us of dispatch ({dispatch}) "
        f"= {kernel_us:.1f} us on a connection's "
        f"{off_us:.0f} us agent-off, which alone would leave ~{at_most:.3f}; "
        f"{target.bound} leaves {budget_us:.1f} us per connection for kernel and agent together"
    )


def results_document(
    figures: Sequence[Figure], omitted: Sequence[Omitted], machine: dict[str, Any], date: str
) -> dict[str, Any]:
    """The results.json document (keys sorted by the writer, so diffs stay small)."""
    keys = [f.key for f in figures]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ValueError(f"figure keys used twice: {sorted(duplicates)}")
    return {
        "machine": machine,
        "date": date,
        "figures": {f.key: f.as_dict() for f in figures},
        "omitted": {o.key: {"title": o.title, "reason": o.reason} for o in omitted},
    }


def _comparison_table(figures: Iterable[Figure]) -> list[str]:
    lines = [
        "| figure | unit | agent off | agent on | on/off | added | per-round on/off | "
        "target | status |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.title} (`{f.key}`) | {f.unit} | {number(f.off.median) if f.off else ''} | "
            f"{number(f.on.median) if f.on else ''} | "
            f"{number(f.ratio.median) if f.ratio else ''} | "
            f"{number(f.added.median) if f.added else ''} | "
            f"{_range(f.ratio)} | {f.target.text if f.target else ''} | {_status(f)} |"
        )
    return lines


def _value_table(figures: Iterable[Figure]) -> list[str]:
    lines = [
        "| figure | unit | median | min to max | rounds | target | status |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for f in figures:
        v = f.value
        assert v is not None
        lines.append(
            f"| {f.title} (`{f.key}`) | {f.unit} | {number(v.median)} | {_range(v)} | "
            f"{len(v.rounds)} | {f.target.text if f.target else ''} | {_status(f)} |"
        )
    return lines


def results_markdown(
    figures: Sequence[Figure],
    omitted: Sequence[Omitted],
    machine: dict[str, Any],
    date: str,
    preamble: str = "",
) -> str:
    out = ["# tcpacct benchmark results", ""]
    out.append(
        f"Run {date} on {machine.get('nproc')} CPUs ({machine.get('cpu_model', '?')}), "
        f"{machine.get('memory_mib')} MiB, kernel {machine.get('kernel')}, "
        f"Python {machine.get('python')}, bcc {machine.get('bcc')}. "
        "Written by `make bench` (bench/run.py); every figure's rounds are in results.json."
    )
    out.append("")
    if preamble:
        out += [preamble.rstrip(), ""]
    missed = [f for f in figures if (v := f.verdict()) is not None and not v[0]]
    targeted = [f for f in figures if f.target is not None]
    out.append("## Targets at a glance")
    out.append("")
    out.append(f"{len(targeted) - len(missed)} of {len(targeted)} targets met.")
    out.append("")
    if targeted:
        out += [
            "| target | figure | where we are | status | why (this run's data) |",
            "|---|---|---:|---|---|",
        ]
        for f in targeted:
            judged = f.judged()
            assert f.target is not None
            where = number(f.target.point(judged)) if judged else "n/a"
            verdict = f.verdict()
            reason = why(f) if verdict is not None and not verdict[0] else ""
            out.append(
                f"| {f.target.text} | `{f.key}` | {where} | {_status(f) or 'n/a'} | {reason} |"
            )
        out.append("")
    for group, title in GROUP_TITLES.items():
        members = [f for f in figures if f.group == group]
        gone = [o for o in omitted if o.key.split(".", 1)[0] == group]
        if not members and not gone:
            continue
        out += [f"## {title}", ""]
        compared = [f for f in members if f.on is not None or f.ratio is not None]
        valued = [f for f in members if f.value is not None and f not in compared]
        if compared:
            out += [*_comparison_table(compared), ""]
        if valued:
            out += [*_value_table(valued), ""]
        for f in members:
            out.append(f"- **{f.title}** - {f.method}" + (f" *{f.note}*" if f.note else ""))
        for f in members:
            profile = f.details.get("profile_top") or f.details.get("profile_top_2000_calls")
            if profile:
                out += ["", f"Hot spots of `{f.key}` (cProfile of one poll, by own time):", ""]
                out += ["```", *profile[:15], "```"]
        for o in gone:
            out.append(f"- **{o.title}** (`{o.key}`) - not measured in this run: {o.reason}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_results(
    directory: Path,
    figures: Sequence[Figure],
    omitted: Sequence[Omitted],
    machine: dict[str, Any],
    date: str,
    preamble: str = "",
) -> tuple[Path, Path]:
    """Write results.json and results.md into ``directory`` (made if missing); their paths."""
    document = results_document(figures, omitted, machine, date)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "results.json"
    md_path = directory / "results.md"
    json_path.write_text(json.dumps(document, indent=2, sort_keys=True, allow_nan=True) + "\n")
    md_path.write_text(results_markdown(figures, omitted, machine, date, preamble))
    return json_path, md_path
