"""The report: the targets of the performance issue checked PASS/FAIL against the
figures, the table of a run (also of an earlier run's JSON: ``run.py --show``) and the
comparison with another run (``--compare``)."""

from __future__ import annotations


# ============================================================== targets
# The targets of the performance issue: (figure, baseline or None for an absolute limit,
# threshold, text). Passes when the speed ratio (vdiskfs/baseline for rates,
# baseline/vdiskfs for times) >= threshold, or for an absolute limit when the vdiskfs
# median < threshold. Issue: seq write >= 1.0x bindfs, seq read >= 0.8x bindfs, both >=
# the Python floor; 4K O_DIRECT >= the floor's IOPS; ext4 within 1.5x of a native loop;
# writes to a fresh clone >= 0.5x unshared; clone 1 GiB >= 10x faster than XFS reflink,
# 64 GiB < 100 ms; RSS < 200 MiB; mount < 2 s; a write during a checkpoint < 20 ms.
CHECKS = [
    ("scrub", "cat", 0.5, ">=0.5x cat"),
    ("thin_fstrim_returned", "native", 0.9, ">=0.9x native"),
    ("seq_write_1m", "bindfs", 1.0, ">=1.0x bindfs"),
    ("seq_write_1m", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("seq_write_128k", "bindfs", 1.0, ">=1.0x bindfs"),
    ("seq_write_128k", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("seq_read", "bindfs", 0.8, ">=0.8x bindfs"),
    ("seq_read", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("fio_randwrite_direct", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("fio_randread_direct", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("qd_scaling_randread", "native", 0.5, ">=0.5x native's scaling"),
    ("cache_randread_warm", "native", 0.8, ">=0.8x native"),
    ("cache_randread_miss", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("ext4_total", "native", 1 / 1.5, "time <=1.5x native"),
    ("fresh_seq_write", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_fio_randwrite_direct", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_fio_randwrite_buffered", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_randwrite_direct", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_randwrite_buffered", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_ext4_rewrite", "unshared", 0.5, ">=0.5x unshared"),
    ("clone_1g", "xfs-reflink", 10.0, ">=10x xfs-reflink"),
    ("clone_64g", None, 100.0, "<100 ms"),
    ("mount_rss", None, 200.0, "<200 MiB"),
    ("mount_rss_used", None, 200.0, "<200 MiB"),
    ("mount_time", None, 2.0, "<2 s"),
    ("lat_ckpt_max", None, 20.0, "<20 ms"),     # issue 12: writes during a checkpoint
]


# With --busy (a CPU hog on one core during the 4K rows): vdiskfs >= 0.9x the Python
# floor on every 4K row; these replace the rows' pyfloor targets above.
BUSY_4K = ("fio_randwrite_direct", "fio_randread_direct", "fio_randwrite_buffered",
           "fio_randread_buffered", "qd_randread_d1", "qd_randread_d4", "qd_randread_d16",
           "qd_randwrite_d1", "qd_randwrite_d4", "qd_randwrite_d16", "qdjobs_randread",
           "qdjobs_randwrite", "cache_randread_warm", "cache_randread_miss")
BUSY_THRESHOLD = 0.9


def checks_for(busy: bool) -> list[tuple]:
    if not busy:
        return CHECKS
    out = [c for c in CHECKS if not (c[0] in BUSY_4K and c[1] == "pyfloor")]
    return out + [(f, "pyfloor", BUSY_THRESHOLD, f">={BUSY_THRESHOLD}x pyfloor (busy)")
                  for f in BUSY_4K]


def speed_ratio(fig: dict, base: str, which: str = "median") -> float | None:
    v, b = fig["values"].get("vdiskfs", {}), fig["values"].get(base, {})
    if which not in v or which not in b or not v[which] or not b[which]:
        return None
    return v[which] / b[which] if fig["higher_is_better"] else b[which] / v[which]


def ratio_range(fig: dict, base: str) -> tuple[float, float] | None:
    v, b = fig["values"].get("vdiskfs", {}), fig["values"].get(base, {})
    if "min" not in v or "min" not in b or not all((v["min"], v["max"], b["min"], b["max"])):
        return None
    if fig["higher_is_better"]:
        return v["min"] / b["max"], v["max"] / b["min"]
    return b["min"] / v["max"], b["max"] / v["min"]


def evaluate_checks(figs: dict, busy: bool = False) -> list[dict]:
    out = []
    for fid, base, thr, text in checks_for(busy):
        fig = figs.get(fid)
        if fig is None:
            continue
        row = {"figure": fid, "target": text, "baseline": base, "threshold": thr}
        v = fig["values"].get("vdiskfs", {})
        if base is None:
            if "median" not in v:
                row.update(result="n/a", why=v.get("na", "not measured"))
            else:
                row.update(value=v["median"], result="PASS" if v["median"] < thr else "FAIL",
                           noisy=v["min"] < thr <= v["max"])
        else:
            r = speed_ratio(fig, base)
            if r is None:
                why = fig["values"].get(base, {}).get("na") or v.get("na") or "not measured"
                row.update(result="n/a", why=why)
            else:
                rr = ratio_range(fig, base)
                row.update(value=r, result="PASS" if r >= thr else "FAIL",
                           noisy=bool(rr and rr[0] < thr <= rr[1]))
        out.append(row)
    return out


# ============================================================== output
MAIN_COLUMNS = ("vdiskfs", "native", "bindfs", "pyfloor")


def fmt_num(v: float, unit: str) -> str:
    if unit == "x":
        return f"{v:.2f}"
    if unit in ("B", "n") and v < 10000:
        return f"{v:.0f}"
    if unit == "IOPS" or (unit in ("MiB/s", "B", "n") and v >= 100):
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    if unit == "ms":
        return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def fmt_cell(val: dict | None, unit: str) -> str:
    if not val:
        return ""
    if "na" in val:
        return "n/a"
    s = fmt_num(val["median"], unit)
    if len(val["samples"]) > 1:
        s += f" ({fmt_num(val['min'], unit)}-{fmt_num(val['max'], unit)})"
    return s


def render_table(data: dict, compare: dict | None = None) -> str:
    """One row per figure and baseline: the vdiskfs cell on the figure's first row, then
    each baseline measured in the same run with the speed ratio against it, and the
    targets of the issue that apply with PASS/FAIL."""
    figs, checks = data["figures"], data["checks"]
    by_fig: dict[tuple[str, str | None], list[dict]] = {}
    for c in checks:
        by_fig.setdefault((c["figure"], c["baseline"]), []).append(c)
    head = ["figure", "unit", "vdiskfs", "baseline", "baseline value", "speed", "target",
            "result"]
    rows: list[list[str] | None] = []
    section = None
    for fid, fig in figs.items():
        if fig["section"] != section:
            if section is not None:
                rows.append(None)
            section = fig["section"]
        vals, unit = fig["values"], fig["unit"]
        bases = [t for t in MAIN_COLUMNS[1:] if t in vals]
        bases += [t for t in vals if t not in MAIN_COLUMNS]
        first = [fig["label"], unit, fmt_cell(vals.get("vdiskfs"), unit)]

        def cells(base: str | None) -> list[str]:
            tg = by_fig.get((fid, base), [])
            return [", ".join(c["target"] for c in tg),
                    " ".join(c["result"] + ("~" if c.get("noisy") else "") for c in tg)]

        rows.append(first + ["", "", ""] + cells(None))
        if bases and not any((fid, None) == k for k in by_fig):
            rows.pop()   # the first baseline goes on the figure's own row
            first_row = True
        else:
            first_row = False
        for b in bases:
            r = speed_ratio(fig, b)
            ratio = f"{r:.2f}x" if r is not None and unit not in ("B", "n") else ""
            lead = first if first_row else ["", "", ""]
            first_row = False
            rows.append(lead + [b, fmt_cell(vals[b], unit), ratio] + cells(b))
    widths = [max(len(r[i]) for r in rows + [head] if r) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) if r else "" for r in rows]
    out.append("")
    out.append("Cells: median (min-max) over the repetitions. speed: vdiskfs/baseline for "
               "rates, baseline/vdiskfs for times (> 1: vdiskfs faster). ~: the min-max range "
               "straddles the threshold (noisy).")
    if data.get("info", {}).get("busy"):
        out.append("BUSY run: " + data["info"]["busy"])
    passed = sum(c["result"] == "PASS" for c in checks)
    failed = sum(c["result"] == "FAIL" for c in checks)
    out.append(f"Targets: {passed} PASS, {failed} FAIL, "
               f"{sum(c['result'] == 'n/a' for c in checks)} n/a")
    for c in checks:
        if c["result"] == "n/a":
            out.append(f"  n/a: {c['target']} ({figs[c['figure']]['label']}): {c.get('why')}")
    if data.get("errors"):
        for name, e in data["errors"].items():
            out.append(f"ERROR in section {name}: {e}")
    ra = data.get("info", {}).get("read_ahead_kb")
    if ra:
        out.append("Read-ahead of each mount's bdi, KiB (native: the disk): "
                   + ", ".join(f"{t} {v}" for t, v in ra.items())
                   + " (vdiskfs and the passthrough mean to raise theirs to 1024)")
    warns = data.get("info", {}).get("daemon_log_warnings")
    if warns:
        out.append(f"vdiskfs daemon.log warnings/errors ({len(warns)}, first 5):")
        out += [f"  {w[:200]}" for w in warns[:5]]
    notes: dict[str, list[str]] = {}
    for f in figs:
        for n in figs[f]["notes"]:
            notes.setdefault(n, []).append(figs[f]["label"])
    if notes:
        out.append("Notes:")
        out += [f"  {', '.join(labels)}: {n}" for n, labels in notes.items()]
    if compare:
        out.append("")
        out += render_compare(data, compare)
    return "\n".join(out)


def render_compare(new: dict, old: dict) -> list[str]:
    out = [f"Compared with {old.get('info', {}).get('git', '?')} "
           f"({old.get('info', {}).get('started', '?')}): median old -> new (change; + is better)"]
    for fid, fig in new["figures"].items():
        ofig = old.get("figures", {}).get(fid)
        if not ofig:
            continue
        for t, v in fig["values"].items():
            ov = ofig["values"].get(t, {})
            if "median" not in v or "median" not in ov or not ov["median"]:
                continue
            ch = v["median"] / ov["median"] - 1
            if not fig["higher_is_better"]:
                ch = ov["median"] / v["median"] - 1 if v["median"] else 0
            out.append(f"  {fig['label']:<40} {t:<18} {fmt_num(ov['median'], fig['unit']):>8} -> "
                       f"{fmt_num(v['median'], fig['unit']):>8} {fig['unit']:<5} ({ch:+.0%})")
    return out
