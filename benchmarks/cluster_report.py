"""Tables and plots of a cluster benchmark run (benchmarks/cluster_bench.py writes its results.json).

    python -m benchmarks.cluster_report docs/cluster/results.json     # rewrites docs/cluster/results.md + img/

Every ratio compares two configurations of the same run at the same (link, nodes x ranks per node):
speed-up = dense median step time / method median step time; byte ratio = dense wire
bytes per step / method wire bytes per step. The targets of issue 5 are checked here.

Example::

    >>> from benchmarks.cluster_report import fmt_bytes
    >>> fmt_bytes(1234), fmt_bytes(12_345_678)
    ('1.2 kB', '12.3 MB')
    >>> shape({"world": 4}), shape({"world": 4, "nodes": 2, "ranks_per_node": 2})
    ('4 nodes', '2 nodes x 2 ranks')
"""

from __future__ import annotations

import json
import os
import sys

from launch.linkrate import parse_rate

ORDER = ("compute", "dense", "fp16", "powersgd1", "powersgd4", "topk1", "topk1hier", "topk1auto", "dgc0.1",
         "dgc0.1hier", "dgc0.1hiercoll", "dgc0.1hierwhole", "dgc0.1auto", "dgc0.1warm", "dgc0.1warmtime",
         "dgc0.1warmar", "dgc0.1warmsplit")


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _ms(x) -> str:
    return "—" if x is None else f"{1e3 * x:.1f}"


def _fmt_ms(ms: float) -> str:
    """Milliseconds: a decimal below 100."""
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def _rate_key(rate: str) -> float:
    return float("inf") if rate == "loopback" else parse_rate(rate)


def _local(p: dict) -> int:
    return p.get("ranks_per_node", 1)


def _nodes(p: dict) -> int:
    return p.get("nodes", p["world"] // _local(p))


def shape(p: dict) -> str:
    """How a point's ranks sit: ``4 nodes`` (one rank each) or ``2 nodes x 2 ranks``."""
    nodes, local = _nodes(p), _local(p)
    if local == 1:
        return f"{nodes} nodes"
    return f"{nodes} node{'s' if nodes > 1 else ''} x {local} ranks"


def _shape_key(p: dict) -> tuple[int, int]:
    return p["world"], -_nodes(p)


def _points(results: dict) -> list[dict]:
    return sorted(results["points"], key=lambda p: (_rate_key(p["rate"]), _shape_key(p)))


def _achieved(p: dict) -> str:
    if p.get("link"):
        return f"{p['link']['bits_per_s'] / 1e6:,.0f} Mbit/s"
    return "one node: no link crossed" if _nodes(p) == 1 and p["rate"] != "loopback" else "unshaped loopback"


def _by_method(ddp: dict) -> dict:
    return {m["method"]: m for m in ddp["methods"]}


def _faster_than_baselines(m: dict, step_s: float, who: str) -> list[tuple[str, str, str]]:
    """Target rows: ``who``'s step (``step_s``) faster than fp16_compress_hook and PowerSGD rank 4, where they ran."""
    rows = []
    for other in ("fp16", "powersgd4"):
        if other in m:
            o = m[other]["step_s"]["median"]
            rows.append((f"{who} faster than {m[other]['label']}", f"{1e3 * step_s:.0f} vs {1e3 * o:.0f} ms",
                         "met" if step_s < o else "missed"))
    return rows


def check_targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) rows for the targets of issues 5, 13 and 15.

    >>> def point(rate, steps):  # 2 nodes of one rank, ResNet-50, median step seconds per method
    ...     methods = [{"method": k, "label": k, "step_s": {"median": v}} for k, v in steps.items()]
    ...     return {"rate": rate, "world": 2, "ddp": {"resnet50": {"methods": methods}}}
    >>> rows = check_targets({"points": [
    ...     point("1gbit", {"dense": 1.0, "fp16": 0.6, "powersgd4": 0.45, "dgc0.1": 0.29, "dgc0.1warm": 0.9}),
    ...     point("10gbit", {"dense": 0.3, "topk1": 0.36, "dgc0.1": 0.28, "dgc0.1warm": 0.4})]})
    >>> [(t.split(": ", 1)[1], ok) for t, _, ok in rows]  # doctest: +NORMALIZE_WHITESPACE
    [('DGC 0.1 % >= 3.2x dense', 'met'), ('DGC 0.1 % faster than fp16', 'met'),
     ('DGC 0.1 % faster than powersgd4', 'met'), ('dgc0.1warm <= 1.05x dense', 'met'),
     ('topk1 <= 1.05x dense', 'missed'), ('dgc0.1 <= 1.05x dense', 'met'), ('dgc0.1warm <= 1.05x dense', 'missed')]
    """
    rows = []
    for p in _points(results):
        ddp = p.get("ddp", {}).get("resnet50")
        if p["rate"] == "1gbit" and (_nodes(p), _local(p)) == (2, 1) and ddp:  # issue 13
            m = _by_method(ddp)
            if {"dense", "dgc0.1"} <= set(m):
                dense, dgc = m["dense"]["step_s"]["median"], m["dgc0.1"]["step_s"]["median"]
                rows.append(("1 Gbit/s, 2 nodes, ResNet-50: DGC 0.1 % >= 3.2x dense", f"{dense / dgc:.2f}x",
                             "met" if dense / dgc >= 3.2 else "missed"))
                rows += _faster_than_baselines(m, dgc, "1 Gbit/s, 2 nodes, ResNet-50: DGC 0.1 %")
            if {"dense", "dgc0.1warm"} <= set(m):
                ratio = m["dgc0.1warm"]["step_s"]["median"] / m["dense"]["step_s"]["median"]
                rows.append((f"1 Gbit/s, 2 nodes, ResNet-50: {m['dgc0.1warm']['label']} <= 1.05x dense",
                             f"{ratio:.2f}x dense", "met" if ratio <= 1.05 else "missed"))
        if p["rate"] == "1gbit" and _nodes(p) == 4 and _local(p) == 1 and ddp:
            m = _by_method(ddp)
            if {"dense", "dgc0.1"} <= set(m):
                dgc = m["dgc0.1"]["step_s"]["median"]
                speedup = m["dense"]["step_s"]["median"] / dgc
                rows.append(("1 Gbit/s, 4 nodes, ResNet-50: DGC >= 10x faster than dense",
                             f"{speedup:.2f}x", "met" if speedup >= 10 else "missed"))
                rows += _faster_than_baselines(m, dgc, "1 Gbit/s, 4 nodes, ResNet-50: DGC")
        if p["rate"] == "1gbit" and (_nodes(p), _local(p)) == (2, 2) and ddp:
            m = _by_method(ddp)
            if {"dense", "dgc0.1"} <= set(m):
                speedup = m["dense"]["step_s"]["median"] / m["dgc0.1"]["step_s"]["median"]
                rows.append(("1 Gbit/s, 2 nodes x 2 ranks, ResNet-50: DGC >= 2x dense", f"{speedup:.2f}x",
                             "met" if speedup >= 2 else "missed"))
            for name in (n for n in m if "hier" in n and "dgc0.1" in m):
                hier, flat = m[name]["step_s"]["median"], m["dgc0.1"]["step_s"]["median"]
                rows.append((f"1 Gbit/s, 2 nodes x 2 ranks, ResNet-50: {m[name]['label']} faster than flat DGC",
                             f"{1e3 * hier:.0f} vs {1e3 * flat:.0f} ms", "met" if hier < flat else "missed"))
        if p["rate"] == "10gbit":
            for model, d in p.get("ddp", {}).items():
                m = _by_method(d)
                if "dense" not in m:
                    continue
                dense = m["dense"]["step_s"]["median"]
                for name in (n for n in m if n.startswith(("topk", "dgc"))):  # every gradsparse method
                    ratio = m[name]["step_s"]["median"] / dense
                    rows.append((f"10 Gbit/s, {shape(p)}, {model}: {m[name]['label']} <= 1.05x dense",
                                 f"{ratio:.2f}x dense", "met" if ratio <= 1.05 else "missed"))
        if p["rate"] == "1gbit" and p.get("comm"):
            for r in p["comm"]["rows"]:
                if r["op"] == "allgather" and r["ideal_s"]:
                    ratio = r["time_s"]["median"] / r["ideal_s"]
                    rows.append((f"1 Gbit/s, {shape(p)}: allgather n={r['n']:,} d={r['density']:g} "
                                 f"<= 1.3x ideal", f"{ratio:.2f}x ideal", "met" if ratio <= 1.3 else "missed"))
    return rows


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    out = ["# Cluster benchmark results (generated)", "",
           f"Command: `{meta.get('command', '?')}` — {meta.get('date', '')}, {meta.get('cpus', '?')} CPUs, "
           f"torch {meta.get('torch', '?')}. Generated by `python -m benchmarks.cluster_report`; "
           "prose and analysis: [../cluster_benchmark.md](../cluster_benchmark.md).", "",
           "## Links (achieved rate measured with one TCP stream, node 1 -> node 0, before the benchmarks)", "",
           "| configured | shape | achieved | tbf burst | load avg (1/5/15 min) before | after |",
           "|---|---|---:|---:|---|---|"]
    for p in _points(results):
        out.append(f"| {p['rate']} | {shape(p)} | {_achieved(p)} | {fmt_bytes(p.get('burst_bytes') or 0)} | "
                   f"{p['load_before']} | {p.get('load_after')} |")
    for f in results.get("failed", []):
        out.append(f"| {f['rate']} | {shape(f)} | FAILED: {f['error']} | | | |")
    out += ["", "## Targets", "", "| target | measured | |", "|---|---:|---|"]
    out += [f"| {t} | {m} | **{ok}** |" for t, m, ok in check_targets(results)]
    out += ["", "## Communication microbenchmark", "",
            "Median of the slowest rank per repetition; wire = this node's interface transmit counter per "
            "operation; ideal = bytes a rank must send / measured link rate (ring allreduce: 2(W-1)/W x 4n; "
            "allgather: (W-1) x payload). `reducer` = a whole SparseReducer step with TopK (select, pack, "
            "allgather, unpack-add) on the same payload size.", ""]
    for p in _points(results):
        if not p.get("comm"):
            continue
        out += [f"### {p['rate']}, {shape(p)} ({_achieved(p)})", "",
                "| n | op | density | payload/rank | wire/rank | median ms | p25–p75 ms | ideal ms | time/ideal |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in p["comm"]["rows"]:
            t = r["time_s"]
            ratio = f"{t['median'] / r['ideal_s']:.2f}" if r.get("ideal_s") else "—"
            out.append(f"| {r['n']:,} | {r['op']} | {r['density']:g} | {fmt_bytes(r['payload_bytes'])} | "
                       f"{fmt_bytes(r['wire_bytes_per_rank'])} | {_ms(t['median'])} | {_ms(t['p25'])}–{_ms(t['p75'])} | "
                       f"{_ms(r.get('ideal_s'))} | {ratio} |")
        out.append("")
    out += ["## End-to-end DDP step", "",
            "Median step time of the slowest rank (forward, backward, optimizer step) over the timed steps, "
            "min–max; hook = wall time inside the comm hook call (synchronous part); compress = gradsparse's "
            "own selection/pack/unpack time per step; wire = this node's transmitted bytes per step; ratios "
            "against dense in the same run. `compute` has no communication: the floor of a step.", ""]
    models = sorted({m for p in results["points"] for m in p.get("ddp", {})})
    for model in models:
        for p in _points(results):
            d = p.get("ddp", {}).get(model)
            if not d:
                continue
            m = _by_method(d)
            dense = m.get("dense")
            out += [f"### {model}, {p['rate']}, {shape(p)} ({_achieved(p)}; batch {d['batch']}/rank, "
                    f"{d['steps']} timed steps after {d['warmup']})", "",
                    "| method | step ms | min–max | hook ms | compress ms | wire/step/rank | bytes vs dense | "
                    "speed-up vs dense |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name in ORDER:
                if name not in m:
                    continue
                r = m[name]
                s = r["step_s"]
                wire = r["wire_bytes_per_step"]
                ratio = f"{dense['wire_bytes_per_step'] / wire:,.1f}x" if dense and wire else "—"
                speed = f"{dense['step_s']['median'] / s['median']:.2f}x" if dense else "—"
                hook = _ms(r["hook_s"]["median"]) if r.get("hook_s") else "—"
                comp = _ms(r["compress_s"]["median"]) if r.get("compress_s") else "—"
                out.append(f"| {r['label']} | {_ms(s['median'])} | {_ms(s['min'])}–{_ms(s['max'])} | {hook} | {comp} | "
                           f"{fmt_bytes(wire) if name != 'compute' else '—'} | {ratio if name != 'compute' else '—'} | "
                           f"{speed} |")
            out.append("")
    out += equal_world_tables(results)
    return "\n".join(out) + "\n"


def equal_world_tables(results: dict) -> list[str]:
    """Markdown: per (rate, model, world size) with several shapes, median step ms per method and shape."""
    out = []
    groups: dict = {}
    for p in _points(results):
        for model in p.get("ddp", {}):
            groups.setdefault((p["rate"], model, p["world"]), []).append(p)
    for (rate, model, world), pts in groups.items():
        if len(pts) < 2:
            continue
        if not out:
            out += ["## Equal world size, different shapes", "",
                    "Median step ms (speed-up against dense of the same shape). Only the links between nodes are "
                    "shaped; the ranks of one node talk over loopback.", ""]
        pts = sorted(pts, key=lambda p: -_nodes(p))
        out += [f"### {model}, {rate}, {world} ranks", "", "| method | " + " | ".join(shape(p) for p in pts) + " |",
                "|---|" + "---:|" * len(pts)]
        methods = [_by_method(p["ddp"][model]) for p in pts]
        for name in ORDER:
            if not any(name in m for m in methods):
                continue
            cells = []
            for m in methods:
                r, dense = m.get(name), m.get("dense")
                if r is None:
                    cells.append("—")
                    continue
                speed = f" ({dense['step_s']['median'] / r['step_s']['median']:.2f}x)" if dense and name != "compute" \
                    else ""
                cells.append(f"{_ms(r['step_s']['median'])}{speed}")
            label = next(m[name]["label"] for m in methods if name in m)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plots(results: dict, img_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    written = []
    points = [p for p in _points(results) if p.get("link")]
    models = sorted({m for p in points for m in p.get("ddp", {})})
    worlds = sorted({shape(p) for p in points}, key=lambda s: _shape_key(next(p for p in points if shape(p) == s)))
    for model in models:
        fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4.2), squeeze=False)
        for ax, world in zip(axes[0], worlds):
            pts = [p for p in points if shape(p) == world and model in p.get("ddp", {})]
            for name in ORDER:
                xs, ys, lo, hi = [], [], [], []
                for p in pts:
                    m = _by_method(p["ddp"][model]).get(name)
                    if m:
                        xs.append(p["link"]["bits_per_s"] / 1e9)
                        ys.append(1e3 * m["step_s"]["median"])
                        lo.append(ys[-1] - 1e3 * m["step_s"]["min"])
                        hi.append(1e3 * m["step_s"]["max"] - ys[-1])
                if xs:
                    label = _by_method(pts[0]["ddp"][model]).get(name, {}).get("label", name) if pts else name
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label,
                                linestyle="--" if name == "compute" else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("measured link rate (Gbit/s)")
            ax.set_ylabel("step time (ms), median, min–max")
            ax.set_title(f"{model}, {world}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(img_dir, f"step_time_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(worlds))
        for j, world in enumerate(worlds):
            pts = [p for p in points if shape(p) == world and model in p.get("ddp", {})]
            if not pts:
                continue
            ref = min(pts, key=lambda p: abs(_rate_key(p["rate"]) - 1e9))  # bytes hardly depend on the rate
            m = _by_method(ref["ddp"][model])
            names = [n for n in ORDER if n in m and n != "compute"]
            ax.bar([i + j * width for i in range(len(names))], [m[n]["wire_bytes_per_step"] for n in names],
                   width, label=f"{world} ({ref['rate']})")
            ax.set_xticks([i + width * (len(worlds) - 1) / 2 for i in range(len(names))])
            ax.set_xticklabels([m[n]["label"].replace("gradsparse ", "gs ") for n in names], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("bytes sent per step per rank (wire)")
        ax.set_title(f"{model}: bytes on the wire per step")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(img_dir, f"bytes_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    comm_pts = [p for p in points if p.get("comm")]
    if comm_pts:
        rates = sorted({p["rate"] for p in comm_pts}, key=_rate_key)
        fig, axes = plt.subplots(len(worlds), len(rates), figsize=(4.5 * len(rates), 3.8 * len(worlds)), squeeze=False)
        for i, world in enumerate(worlds):
            for j, rate in enumerate(rates):
                ax = axes[i][j]
                p = next((q for q in comm_pts if q["rate"] == rate and shape(q) == world), None)
                if p is None:
                    ax.set_visible(False)
                    continue
                rows = p["comm"]["rows"]
                for op, dens in [("dense", 1.0)] + [(op, d) for op in ("allgather", "reducer")
                                                     for d in sorted({r["density"] for r in rows if r["op"] != "dense"})]:
                    sel = [r for r in rows if r["op"] == op and r["density"] == dens]
                    if not sel:
                        continue
                    label = "dense allreduce" if op == "dense" else f"{op} {100 * dens:g} %"
                    line, = ax.plot([r["n"] for r in sel], [1e3 * r["time_s"]["median"] for r in sel], marker="o",
                                    label=label)
                    if op != "reducer" and sel[0].get("ideal_s"):
                        ax.plot([r["n"] for r in sel], [1e3 * r["ideal_s"] for r in sel], linestyle=":",
                                color=line.get_color())
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{rate}, {world} (dotted: ideal)", fontsize=9)
                ax.set_xlabel("gradient elements")
                ax.set_ylabel("ms")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(img_dir, "comm.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def point_rows(point: dict, model: str, labels: dict | None = None) -> list[dict]:
    """One point's DDP methods in ORDER with their ratios against dense of the same run (None without dense).

    ``labels`` replaces the labels of some methods (by method name).
    """
    m = _by_method(point["ddp"][model])
    dense = m.get("dense")
    rows = []
    for name in ORDER:
        if name not in m:
            continue
        r = m[name]
        sent = r.get("sent_bytes_per_step")
        rows.append({"method": name, "label": (labels or {}).get(name, r["label"]), "step_ms": 1e3 * r["step_s"]["median"],
                     "min_ms": 1e3 * r["step_s"]["min"], "max_ms": 1e3 * r["step_s"]["max"],
                     "speedup": dense["step_s"]["median"] / r["step_s"]["median"] if dense else None,
                     "sent_bytes": sent, "wire_bytes": r["wire_bytes_per_step"],
                     "bytes_ratio": dense["sent_bytes_per_step"] / sent if dense and sent else None,
                     "density": r.get("density")})
    return rows


def point_table(point: dict, model: str, wire: bool = True, labels: dict | None = None) -> str:
    """A plain-text table of one point's DDP methods (step time, speed-up, bytes sent, bytes on the wire)."""
    head = (f"{'method':<42}{'step ms':>9}{'min–max':>15}{'speed-up':>10}{'sent/step/rank':>16}{'fewer bytes':>13}"
            + (f"{'wire/step/node':>16}" if wire else ""))
    lines = [head, "-" * len(head)]
    for r in point_rows(point, model, labels):
        comm = r["method"] != "compute"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] and comm else "—"
        ratio = f"{r['bytes_ratio']:,.0f}x" if r["bytes_ratio"] and r["bytes_ratio"] >= 10 else \
            (f"{r['bytes_ratio']:.1f}x" if r["bytes_ratio"] else "—")
        lines.append(f"{r['label']:<42}{_fmt_ms(r['step_ms']):>9}{_fmt_ms(r['min_ms']):>7}–{_fmt_ms(r['max_ms']):<7}"
                     f"{speed:>10}"
                     f"{fmt_bytes(r['sent_bytes']) if comm else '—':>16}{ratio if comm else '—':>13}"
                     + (f"{fmt_bytes(r['wire_bytes']) if comm else '—':>16}" if wire else ""))
    return "\n".join(lines)


def point_plot(point: dict, model: str, path: str, title: str, labels: dict | None = None) -> str:
    """Bar charts of one point: median step time per method (min–max) and bytes sent per step and rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = point_rows(point, model, labels)
    ticks = [r["label"].replace("gradsparse ", "gradsparse\n").replace(" (", "\n(") for r in rows]
    ys = range(len(rows))
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 0.7 * len(rows) + 2), sharey=True)
    colors = ["tab:olive" if r["method"].startswith("dgc0.1warm") else "tab:green" if r["method"].startswith(("dgc", "topk"))
              else "tab:gray" if r["method"] == "compute" else "tab:blue" for r in rows]
    ax_t.barh(ys, [r["step_ms"] for r in rows], color=colors,
              xerr=[[r["step_ms"] - r["min_ms"] for r in rows], [r["max_ms"] - r["step_ms"] for r in rows]], capsize=3)
    for y, r in zip(ys, rows):
        speed = f"  ({r['speedup']:.2f}x dense)" if r["speedup"] and r["method"] != "compute" else ""
        ax_t.text(r["max_ms"], y, f" {_fmt_ms(r['step_ms'])} ms{speed}", va="center", fontsize=8)
    ax_t.set_yticks(list(ys))
    ax_t.set_yticklabels(ticks, fontsize=8)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("step time (ms): median of the slowest rank, min–max")
    ax_t.set_xlim(0, 1.45 * max(r["max_ms"] for r in rows))
    comm = [(y, r) for y, r in zip(ys, rows) if r["sent_bytes"]]
    ax_b.barh([y for y, _ in comm], [r["sent_bytes"] for _, r in comm], color=[colors[y] for y, _ in comm])
    for y, r in comm:
        ax_b.text(r["sent_bytes"], y, f" {fmt_bytes(r['sent_bytes'])}", va="center", fontsize=8)
    ax_b.set_xscale("log")
    low = min(r["sent_bytes"] for _, r in comm) / 3
    ax_b.set_xlim(low, max(r["sent_bytes"] for _, r in comm) * 6)
    for y, r in zip(ys, rows):
        if not r["sent_bytes"]:
            ax_b.text(low, y, "  no communication", va="center", fontsize=8, color="gray")
    ax_b.set_xlabel("bytes sent per step and rank (log scale)")
    for ax in (ax_t, ax_b):
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: str) -> None:
    """Write ``<out_dir>/results.md`` and the PNG plots under ``<out_dir>/img``."""
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    plots(results, os.path.join(out_dir, "img"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "docs/cluster/results.json"
    with open(path) as f:
        results = json.load(f)
    write_report(results, os.path.dirname(path) or ".")


if __name__ == "__main__":
    main()
