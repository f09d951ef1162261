#!/usr/bin/env python3
"""Plans the `lse bench` calls of bench/peers/run.sh and merges their output with peers.py's
into one table (markdown) and one JSON document. Standard library only.

  report.py plan --cases CASES
      One line per `lse bench` call that covers CASES ("op:ROWSxCLASSES:dtype,..."):
      "OPS DTYPE SHAPE" (OPS comma-separated). `lse bench` times every op x dtype x shape it is
      given, so cases are grouped by (dtype, shape): the calls time exactly the cases asked.

  report.py merge --cases CASES --lse A.json [B.json ...] --peers PEERS.json
                  [--meta KEY=VALUE ...] --json OUT.json --md OUT.md
      Writes the merged document and the table, and prints the table.

The lse side is `lse bench --json`: {"machine": {"cpu", "cores"}, "threads", "kernel",
"copy_gbs", "results": [{"op", "dtype", "rows", "classes", "threads", "best_s", "median_s",
"gelem_s", "gbs", "bandwidth_fraction"}]}. The peers side is peers.py's document.
"""

from __future__ import annotations

import argparse
import json
import sys


LINEAR_OP = "linear_cross_entropy"


def parse_all_cases(text: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, dims): dims is (rows, classes), or (N, D, V) for the linear op."""
    cases = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        op, shape, dtype = item.split(":")
        cases.append((op, dtype, tuple(int(v) for v in shape.lower().split("x"))))
    return cases


def parse_cases(text: str) -> list[tuple[str, str, int, int]]:
    """The row-wise cases (every op but the linear one) as (op, dtype, rows, classes)."""
    return [(op, dtype, *dims) for op, dtype, dims in parse_all_cases(text) if op != LINEAR_OP]


def parse_linear_cases(text: str) -> list[tuple[str, int, int, int]]:
    """The linear cross-entropy cases as (dtype, N, D, V)."""
    return [(dtype, *dims) for op, dtype, dims in parse_all_cases(text) if op == LINEAR_OP]


def plan(args) -> int:
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for op, dtype, dims in parse_all_cases(args.cases):
        ops = groups.setdefault((dtype, dims), [])
        if op not in ops:
            ops.append(op)
    for (dtype, dims), ops in groups.items():
        print(f"{','.join(ops)} {dtype} {'x'.join(map(str, dims))}")
    return 0


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def fmt_rate(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def fmt_ratio(num, den) -> str:
    if num is None or den is None or den == 0:
        return "—"
    return f"{num / den:.2f}×"


def fmt_fraction(value) -> str:
    return "—" if value is None else f"{value * 100:.0f} %"


def fmt_seconds(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def fmt_gflops(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def fmt_mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def linear_table(cases, lse_linear, peer_rows) -> tuple[list[str], list[dict], list[str]]:
    """The fused linear cross-entropy's table: times, ratios and peak extra memory."""
    rows_out, notes = [], []
    for dtype, n, d, v in cases:
        lse = lse_linear.get((dtype, n, d, v), {})
        peers = {key: peer_rows.get((key, LINEAR_OP, dtype, n, d, v), {})
                 for key in ("torch", "torch.lce", "jax", "lse.torch")}
        for key, row in peers.items():
            if row.get("skipped"):
                notes.append(f"{key} {LINEAR_OP} {n}x{d}x{v} {dtype}: {row['skipped']}")
        ratio = {key: (row["best_s"] / lse["best_s"]
                       if row.get("best_s") and lse.get("best_s") else None)
                 for key, row in peers.items()}
        rows_out.append({
            "shape": f"{n}x{d}x{v}", "dtype": dtype, "lse": lse or None,
            "torch": peers["torch"] or None, "torch_lce": peers["torch.lce"] or None,
            "jax": peers["jax"] or None, "lse_torch": peers["lse.torch"] or None,
            "lse_torch_over_torch": (peers["torch"]["best_s"] / peers["lse.torch"]["best_s"]
                                     if peers["torch"].get("best_s")
                                     and peers["lse.torch"].get("best_s") else None),
            "lse_torch_over_torch_lce": (peers["torch.lce"]["best_s"]
                                         / peers["lse.torch"]["best_s"]
                                         if peers["torch.lce"].get("best_s")
                                         and peers["lse.torch"].get("best_s") else None),
            "lse_over_torch": ratio["torch"], "lse_over_torch_lce": ratio["torch.lce"],
            "lse_over_jax": ratio["jax"],
        })
    if not rows_out:
        return [], [], notes

    def ratio_text(value):
        return "—" if value is None else f"{value:.2f}×"

    lines = [
        "",
        "Fused linear cross-entropy, forward + backward (loss, dH, dW, db) from hidden states "
        "H [N, D], weight W [V, D], bias [V]: seconds (best), ratios > 1 mean lse is faster, "
        "\"of gemm\" is the matrix crate alone on the same three products over lse's time, "
        "peak extra memory in MiB (growth of the peak resident set over one call). PyTorch "
        "unfused is `F.cross_entropy(F.linear(H, W, b), t)`, F.lce is "
        "`F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`, JAX is "
        "`jit(value_and_grad)` of the unfused mean; lse.torch is "
        "`lse.torch.linear_cross_entropy(H, W, t, linear_bias=b)` + backward, called from "
        "PyTorch (the binding's overhead included).",
        "",
        "| N×D×V | dtype | lse s | lse GFLOP/s | lse of gemm | PyTorch unfused s | F.lce s "
        "| JAX s | lse/unfused | lse/F.lce | lse/JAX | peak MiB lse | unfused | F.lce | JAX "
        "| lse.torch s | lse.torch/unfused | lse.torch/F.lce | peak MiB lse.torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|",
    ]
    for r in rows_out:
        lse = r["lse"] or {}
        t, c, j, b = (r[k] or {} for k in ("torch", "torch_lce", "jax", "lse_torch"))
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {fmt_seconds(lse.get('best_s'))} "
            f"| {fmt_gflops(lse.get('gflops'))} "
            f"| {fmt_fraction(lse.get('matmul_fraction'))} "
            f"| {fmt_seconds(t.get('best_s'))} | {fmt_seconds(c.get('best_s'))} "
            f"| {fmt_seconds(j.get('best_s'))} | {ratio_text(r['lse_over_torch'])} "
            f"| {ratio_text(r['lse_over_torch_lce'])} | {ratio_text(r['lse_over_jax'])} "
            f"| {fmt_mib(lse.get('peak_extra_bytes'))} | {fmt_mib(t.get('peak_extra_bytes'))} "
            f"| {fmt_mib(c.get('peak_extra_bytes'))} | {fmt_mib(j.get('peak_extra_bytes'))} "
            f"| {fmt_seconds(b.get('best_s'))} | {ratio_text(r['lse_torch_over_torch'])} "
            f"| {ratio_text(r['lse_torch_over_torch_lce'])} "
            f"| {fmt_mib(b.get('peak_extra_bytes'))} |")
    return lines, rows_out, notes


def merge(args) -> int:
    cases = parse_cases(args.cases)
    linear_cases = parse_linear_cases(args.cases)
    meta = dict(item.split("=", 1) for item in args.meta)

    lse_docs, lse_linear = [], {}
    for path in args.lse:
        with open(path) as f:
            doc = json.load(f)
        if isinstance(doc, list):  # `lse bench --op linear_cross_entropy --json`
            for r in doc:
                lse_linear[(r["dtype"], r["rows"], r["dim"], r["classes"])] = r
        else:
            lse_docs.append(doc)
    lse_rows = {}
    for doc in lse_docs:
        for r in doc.get("results", []):
            lse_rows[(r["op"], r["dtype"], r["rows"], r["classes"])] = dict(
                r, copy_gbs=doc.get("copy_gbs"), kernel=doc.get("kernel"))

    with open(args.peers) as f:
        peers = json.load(f)
    peer_rows = {}
    for r in peers.get("results", []):
        if r["op"] == LINEAR_OP:
            peer_rows[(r["framework"], r["op"], r["dtype"], r["rows"], r["dim"], r["classes"])] = r
        else:
            peer_rows[(r["framework"], r["op"], r["dtype"], r["rows"], r["classes"])] = r
    frameworks = peers.get("frameworks", {})

    first = lse_docs[0] if lse_docs else {}
    machine = first.get("machine", {})
    cpu = machine.get("cpu") or meta.get("cpu", "?")
    kernels = sorted({d.get("kernel") for d in lse_docs if d.get("kernel")})
    copy = [d["copy_gbs"] for d in lse_docs if d.get("copy_gbs") is not None]
    threads = first.get("threads", peers.get("threads"))

    def version(name):
        fw = frameworks.get(name)
        if not fw:
            return "not run"
        return fw.get("version") or f"unavailable ({fw.get('error')})"

    rows_out = []
    notes = []
    for op, dtype, rows, classes in cases:
        lse = lse_rows.get((op, dtype, rows, classes), {})
        torch = peer_rows.get(("torch", op, dtype, rows, classes), {})
        jax = peer_rows.get(("jax", op, dtype, rows, classes), {})
        binding = peer_rows.get(("lse.torch", op, dtype, rows, classes), {})
        for name, key, row in (("PyTorch", "torch", torch), ("JAX", "jax", jax),
                               ("lse.torch", "lse.torch", binding)):
            if row.get("skipped") and frameworks.get(key, {}).get("available"):
                notes.append(f"{name} {op} {rows}x{classes} {dtype}: {row['skipped']}")
        rows_out.append({
            "op": op, "shape": f"{rows}x{classes}", "dtype": dtype,
            "rows": rows, "classes": classes,
            "lse_gelem_s": lse.get("gelem_s"),
            "torch_gelem_s": torch.get("gelem_s"),
            "jax_gelem_s": jax.get("gelem_s"),
            "lse_over_torch": (lse["gelem_s"] / torch["gelem_s"]
                               if lse.get("gelem_s") and torch.get("gelem_s") else None),
            "lse_over_jax": (lse["gelem_s"] / jax["gelem_s"]
                             if lse.get("gelem_s") and jax.get("gelem_s") else None),
            "lse_bandwidth_fraction": lse.get("bandwidth_fraction"),
            "lse_torch_gelem_s": binding.get("gelem_s"),
            "lse_torch_over_torch": (binding["gelem_s"] / torch["gelem_s"]
                                     if binding.get("gelem_s") and torch.get("gelem_s")
                                     else None),
            "lse": lse or None, "torch": torch or None, "jax": jax or None,
            "lse_torch": binding or None,
        })

    header = {
        "date": meta.get("date", "?"),
        "cpu": cpu,
        # run.sh's count of the cores it may use: lse's own is the pinned count under taskset.
        "cores": int(meta["cores"]) if meta.get("cores") else machine.get("cores"),
        "threads": threads,
        "lse": meta.get("lse_version", "?"),
        "lse_kernel": ", ".join(kernels) or "?",
        "copy_gbs": max(copy) if copy else None,
        "torch": version("torch"),
        "jax": version("jax"),
        "lse_torch": version("lse.torch"),
        "mode": meta.get("mode", ""),
        "repeats": meta.get("repeats"),
        "load_before": meta.get("load"),
    }

    lines = [
        f"# lse vs PyTorch vs JAX on the CPU — {header['date']}",
        "",
        f"- CPU: {header['cpu']} ({header['cores']} cores); threads: {header['threads']}"
        + (f" (each side pinned to {header['threads']} of them)"
           if header["cores"] and header["threads"] and header["threads"] < header["cores"]
           else ""),
        f"- lse: {header['lse']}"
        + (f", kernel {header['lse_kernel']}; copy bandwidth "
           + (f"{header['copy_gbs']:.1f} GB/s" if header["copy_gbs"] else "?")
           if lse_docs else ""),
        f"- PyTorch: {header['torch']}",
        f"- JAX: {header['jax']}",
    ]
    with_binding = "lse.torch" in frameworks
    if with_binding:
        lines.append(f"- lse.torch (lse's Python binding, called from PyTorch): {header['lse_torch']}")
    if header["mode"]:
        lines.append(f"- mode: {header['mode']}")
    if header["repeats"]:
        lines.append(f"- timing: best of {header['repeats']} calls after warm-up, per case")
    if header["load_before"] is not None:
        lines.append(f"- load average before the run: {header['load_before']}"
                     + (" (not idle: numbers are skewed)"
                        if _float(header["load_before"]) > 0.5 else ""))
    row_lines = [
        "",
        "G elem/s = rows × classes / best time (higher is better); ratios > 1 mean lse is "
        "faster. \"of copy\" is lse's bytes-moved rate over the machine's copy bandwidth.",
        "",
        "| op | shape | dtype | lse G elem/s | PyTorch G elem/s | JAX G elem/s "
        "| lse/PyTorch | lse/JAX | lse of copy |"
        + (" lse.torch G elem/s | lse.torch/PyTorch |" if with_binding else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_binding else ""),
    ]
    for r in rows_out:
        row_lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {fmt_rate(r['lse_gelem_s'])} "
            f"| {fmt_rate(r['torch_gelem_s'])} | {fmt_rate(r['jax_gelem_s'])} "
            f"| {fmt_ratio(r['lse_gelem_s'], r['torch_gelem_s'])} "
            f"| {fmt_ratio(r['lse_gelem_s'], r['jax_gelem_s'])} "
            f"| {fmt_fraction(r['lse_bandwidth_fraction'])} |"
            + (f" {fmt_rate(r['lse_torch_gelem_s'])} "
               f"| {fmt_ratio(r['lse_torch_gelem_s'], r['torch_gelem_s'])} |"
               if with_binding else ""))
    if rows_out:
        lines += row_lines
    linear_lines, linear_rows, linear_notes = linear_table(linear_cases, lse_linear, peer_rows)
    lines += linear_lines
    notes += linear_notes
    for name, key in (("PyTorch", "torch"), ("JAX", "jax"), ("lse.torch", "lse.torch"),
                      ("F.linear_cross_entropy", "torch.lce")):
        fw = frameworks.get(key)
        if fw and not fw.get("available"):
            notes.append(f"{name} did not run: {fw.get('error')}")
    missing = [f"{r['op']} {r['shape']} {r['dtype']}" for r in rows_out if not r["lse"]]
    missing += [f"{LINEAR_OP} {r['shape']} {r['dtype']}" for r in linear_rows if not r["lse"]]
    if missing:
        notes.append("lse bench reported nothing for: " + "; ".join(missing))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    table = "\n".join(lines) + "\n"

    doc = {"header": header, "rows": rows_out, "linear_rows": linear_rows, "notes": notes,
           "lse_raw": lse_docs, "peers_raw": peers}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(args.md, "w") as f:
        f.write(table)
    sys.stdout.write(table)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--cases", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--cases", required=True)
    m.add_argument("--lse", nargs="*", default=[])
    m.add_argument("--peers", required=True)
    m.add_argument("--meta", nargs="*", default=[])
    m.add_argument("--json", required=True)
    m.add_argument("--md", required=True)
    args = parser.parse_args()
    return plan(args) if args.command == "plan" else merge(args)


if __name__ == "__main__":
    sys.exit(main())
