#!/usr/bin/env python3
"""Time PyTorch's and JAX's CPU logsumexp, softmax, log_softmax and cross-entropy (forward and
backward) on the same cases as `lse bench`, at a fixed thread count.

Each framework runs in a child process of its own (so that one framework's idle thread pool
cannot spin on the cores the other is using), with its threads fixed before the framework is
imported:

* the process is pinned to N cores with os.sched_setaffinity when N is below the cores it may
  use (JAX sizes its XLA:CPU thread pool from this affinity mask: it is the control that works
  in current jaxlib; PyTorch's default thread count follows it too);
* PyTorch: OMP_NUM_THREADS=N and MKL_NUM_THREADS=N in the environment, then
  torch.set_num_threads(N) and torch.set_num_interop_threads(N) right after import;
* JAX: JAX_PLATFORMS=cpu and XLA_FLAGS="--xla_cpu_multi_thread_eigen=true
  intra_op_parallelism_threads=N" (the second token is honoured only by old XLA builds; current
  ones skip it silently, which is why the affinity mask matters).

Every case runs --warmup untimed calls (for JAX the first of them compiles the jitted function,
so compile time is excluded) and --repeats timed calls; the best and the median are reported,
and G elements/s = rows * classes / best seconds / 1e9.

The ops, with the names `lse bench` uses (the frameworks "torch", "jax", "lse.torch" and, for
linear_cross_entropy only, "torch.lce"):
  logsumexp           torch.logsumexp(x, dim=-1)          jax.nn.logsumexp(x, axis=-1)
  softmax             torch.softmax(x, -1)                jax.nn.softmax(x, axis=-1)
  log_softmax         F.log_softmax(x, -1)                jax.nn.log_softmax(x, axis=-1)
  cross_entropy_grad  F.cross_entropy(x, t) then           jax.jit(jax.value_and_grad(mean CE)),
                      loss.backward() (x.grad is reset     mean CE = mean(logsumexp(x) - x[arange, t])
                      to None outside the timed region)
  linear_cross_entropy (shape NxDxV: hidden states H [N, D], weight W [V, D], bias b [V])
                      unfused: F.cross_entropy(F.linear(   jax.jit(jax.value_and_grad(mean CE of
                      H, W, b), t) + loss.backward();      H @ W.T + b, argnums=(0, 1, 2)))
                      and, as the framework "torch.lce",
                      F.linear_cross_entropy(H, W, t, linear_bias=b,
                      options=nn.LinearCrossEntropyOptions()) (its chunked path) + backward
The framework "lse.torch" runs the same PyTorch code with lse's Python binding in place of
PyTorch's ops (lse.torch.logsumexp, softmax, log_softmax, cross_entropy + loss.backward(), and
lse.torch.linear_cross_entropy(H, W, t, linear_bias=b) + backward at its default budget), so
that the binding's overhead (tensor views, output allocation, the custom op's dispatch and
autograd) is part of its time; its kernels use RAYON_NUM_THREADS=N.

Linear cases also report "peak_extra_bytes": the growth of the process's peak resident set over
one call (the first, untimed one), measured as `lse bench` does: after gc and malloc_trim, the
peak is reset through /proc/self/clear_refs, and VmHWM - VmRSS(before) is read after the call.
Each framework's path runs once on a tiny problem (8 rows) first, so that one-time set-up
(lse.torch's first custom-op dispatch alone is about 78 MB of the process) is not counted as
the call's memory, while no buffer of the measured shape exists yet.
Their rate is "gflops" = 6 * N * D * V / best seconds / 1e9 (three products of 2 * N * D * V).

Inputs are N(0, 1) * 3 logits from a fixed seed (as in `lse bench`), built in f32 and cast to
the case's dtype outside the timed region; targets are uniform in 0..classes.

Output: one JSON document on stdout (or --out FILE), merged from the JSON lines each
framework's child process prints as it goes:
  {"threads", "cases", "frameworks": {NAME: {"version", "available", "error", "settings"}},
   "results": [{"framework", "op", "dtype", "rows", "dim", "classes", "threads", "best_s",
                "median_s", "gelem_s", "gflops", "peak_extra_bytes", "skipped"}]}
"skipped" is null for a timed case, or says why the framework could not run it (a dtype the
framework does not support on the CPU for that op, for example); its times are then null.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

OPS = ("logsumexp", "softmax", "log_softmax", "cross_entropy_grad", "linear_cross_entropy")
LINEAR_OPS = ("linear_cross_entropy",)
DTYPES = ("f32", "bf16", "f16")
# "torch.lce" (F.linear_cross_entropy's chunked path) has only the linear op.
FRAMEWORKS = ("torch", "jax", "lse.torch", "torch.lce")
# The project's targets table.
DEFAULT_CASES = (
    "logsumexp:4096x32000:f32,"
    "softmax:4096x32000:f32,"
    "log_softmax:4096x32000:f32,"
    "cross_entropy_grad:4096x32000:f32,"
    "cross_entropy_grad:4096x32000:bf16,"
    "cross_entropy_grad:65536x1000:f32,"
    "softmax:65536x1000:bf16"
)
SEED = 0x6C73655F
LOGIT_SCALE = 3.0


# --------------------------------------------------------------------------------------------
# Cases


def parse_cases(text: str) -> list[dict]:
    """Parses "op:ROWSxCLASSES:dtype,..." (NxDxV for the linear op) into case dicts, rejecting
    unknown names."""
    cases = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            op, shape, dtype = item.split(":")
            dims = [int(v) for v in shape.lower().split("x")]
        except ValueError:
            raise SystemExit(f"peers.py: bad case {item!r}: want op:ROWSxCLASSES:dtype")
        if op not in OPS:
            raise SystemExit(f"peers.py: unknown op {op!r} (ops: {', '.join(OPS)})")
        if dtype not in DTYPES:
            raise SystemExit(f"peers.py: unknown dtype {dtype!r} (dtypes: {', '.join(DTYPES)})")
        want = 3 if op in LINEAR_OPS else 2
        if len(dims) != want or min(dims) <= 0:
            form = "NxDxV" if want == 3 else "ROWSxCLASSES"
            raise SystemExit(f"peers.py: bad shape {shape!r} for {op}: want {form}")
        rows, classes = dims[0], dims[-1]
        dim = dims[1] if want == 3 else None
        cases.append({"op": op, "dtype": dtype, "rows": rows, "dim": dim, "classes": classes})
    if not cases:
        raise SystemExit("peers.py: no cases")
    return cases


def case_shape(case: dict) -> str:
    dims = (case["rows"], case.get("dim"), case["classes"])
    return "x".join(str(d) for d in dims if d is not None)


def case_name(case: dict) -> str:
    return f"{case['op']}:{case_shape(case)}:{case['dtype']}"


def flops(case: dict) -> float:
    """6·N·D·V: the three products of a linear cross-entropy's forward and backward."""
    return 6.0 * case["rows"] * case["dim"] * case["classes"]


# --------------------------------------------------------------------------------------------
# Threads


def pin_threads(threads: int) -> dict:
    """Pins this process to `threads` of the cores it may use (the lowest-numbered ones) when
    that is fewer than all of them. Returns what was done, for the report."""
    allowed = sorted(os.sched_getaffinity(0))
    pinned = None
    if threads < len(allowed):
        pinned = allowed[:threads]
        os.sched_setaffinity(0, pinned)
    return {
        "cores_allowed": len(allowed),
        "affinity": sorted(os.sched_getaffinity(0)),
        "pinned": pinned is not None,
    }


def framework_env(framework: str, threads: int) -> dict:
    """The environment a framework's child process starts with."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["RAYON_NUM_THREADS"] = str(threads)  # lse.torch's kernels
    if framework == "jax":
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
        ).strip()
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# --------------------------------------------------------------------------------------------
# Timing


def time_calls(setup, call, warmup: int, repeats: int) -> tuple[float, float]:
    """Runs setup() then call() warmup times untimed, then `repeats` times timed (setup() stays
    outside the timed region). Returns (best, median) seconds."""
    for _ in range(warmup):
        setup()
        call()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            setup()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return min(times), statistics.median(times)


def make_inputs(rows: int, classes: int):
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    x *= np.float32(LOGIT_SCALE)
    t = rng.integers(0, classes, size=rows, dtype=np.int64)
    return x, t


def make_linear_inputs(rows: int, dim: int, classes: int):
    """Hidden states N(0, 1), weights N(0, 3²/D) (logits about N(0, 3²), as `lse bench`), a
    bias N(0, 0.1²), uniform targets; all f32."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    h = rng.standard_normal((rows, dim), dtype=np.float32)
    w = rng.standard_normal((classes, dim), dtype=np.float32)
    w *= np.float32(LOGIT_SCALE / dim**0.5)
    b = rng.standard_normal(classes, dtype=np.float32)
    b *= np.float32(0.1)
    t = rng.integers(0, classes, size=rows, dtype=np.int64)
    return h, w, b, t


def nothing() -> None:
    pass


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_extra_bytes(call):
    """Runs call() once and returns how far the process's peak resident set rose above its
    resident set before the call (bytes), or None where Linux's counters are unavailable.
    Freed memory the allocator still holds is given back first (malloc_trim), so that reused
    pages do not hide the call's own peak."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        call()
        return None
    call()
    return max(_status_bytes("VmHWM") - before, 0)


def time_linear(setup, call, warmup: int, repeats: int) -> dict:
    """The linear cases: the first call (untimed) measures the peak extra memory, then the
    usual warm-up and timed calls."""
    setup()
    peak = peak_extra_bytes(call)
    best, median = time_calls(setup, call, max(warmup - 1, 0), repeats)
    return {"best": best, "median": median, "peak_extra_bytes": peak}


# --------------------------------------------------------------------------------------------
# PyTorch


def torch_bench(cases: list[dict], threads: int, warmup: int, repeats: int, ops=None):
    """PyTorch's own ops, or (``ops="lse"``) lse's Python binding of them, ``lse.torch``:
    the same tensors, the same calls, the binding's overhead included."""
    import torch
    import torch.nn.functional as F

    if ops == "lse":
        import lse
        import lse.torch as lt

        logsumexp, softmax, log_softmax, cross_entropy = (
            lt.logsumexp, lt.softmax, lt.log_softmax, lt.cross_entropy)
    else:
        logsumexp, softmax, log_softmax, cross_entropy = (
            torch.logsumexp, torch.softmax, F.log_softmax, F.cross_entropy)

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # only allowed once, before any inter-op work; harmless if already set
    info = {
        "version": (f"lse {lse.__version__} ({lse.active_kernel()}) on torch {torch.__version__}"
                    if ops == "lse" else torch.__version__),
        "settings": {
            "torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads(),
            "cuda_available": torch.cuda.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def linear_step(h, w, b, t):
        if ops == "lce":
            chunked = torch.nn.LinearCrossEntropyOptions()
            F.linear_cross_entropy(h, w, t, linear_bias=b, options=chunked).backward()
        elif ops == "lse":
            lt.linear_cross_entropy(h, w, t, linear_bias=b).backward()
        else:
            F.cross_entropy(F.linear(h, w, b), t).backward()

    def linear_tensors(dtype, rows, dim, classes):
        h_np, w_np, b_np, t_np = make_linear_inputs(rows, dim, classes)
        h, w, b = (torch.from_numpy(a).to(dtype).contiguous().requires_grad_()
                   for a in (h_np, w_np, b_np))
        return h, w, b, torch.from_numpy(t_np)

    def run_linear(case):
        dtype = dtypes[case["dtype"]]
        linear_step(*linear_tensors(dtype, 8, 16, 32))  # one-time set-up, not the call's memory
        h, w, b, t = linear_tensors(dtype, case["rows"], case["dim"], case["classes"])

        def reset():
            h.grad = w.grad = b.grad = None

        return time_linear(reset, lambda: linear_step(h, w, b, t), warmup, repeats)

    def run(case):
        if case["op"] in LINEAR_OPS:
            return run_linear(case)
        if ops == "lce":
            raise NotImplementedError("torch.lce runs linear_cross_entropy only")
        x_np, t_np = make_inputs(case["rows"], case["classes"])
        x = torch.from_numpy(x_np).to(dtypes[case["dtype"]]).contiguous()
        del x_np
        op = case["op"]
        if op == "logsumexp":
            return time_calls(nothing, lambda: logsumexp(x, -1), warmup, repeats)
        if op == "softmax":
            return time_calls(nothing, lambda: softmax(x, -1), warmup, repeats)
        if op == "log_softmax":
            return time_calls(nothing, lambda: log_softmax(x, -1), warmup, repeats)
        t = torch.from_numpy(t_np)
        x.requires_grad_()

        def reset():
            x.grad = None  # what optimizer.zero_grad() does by default

        def step():
            loss = cross_entropy(x, t)
            loss.backward()

        return time_calls(reset, step, warmup, repeats)

    return info, run


# --------------------------------------------------------------------------------------------
# JAX


def jax_bench(cases: list[dict], threads: int, warmup: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import jaxlib

    info = {
        "version": f"{jax.__version__} (jaxlib {jaxlib.__version__})",
        "settings": {
            "devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        },
    }
    dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}

    def mean_ce(x, t):
        picked = x[jnp.arange(x.shape[0]), t]
        return jnp.mean(jax.nn.logsumexp(x, axis=-1) - picked)

    fns = {
        "logsumexp": jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1)),
        "softmax": jax.jit(lambda x: jax.nn.softmax(x, axis=-1)),
        "log_softmax": jax.jit(lambda x: jax.nn.log_softmax(x, axis=-1)),
        "cross_entropy_grad": jax.jit(jax.value_and_grad(mean_ce)),
        "linear_cross_entropy": jax.jit(jax.value_and_grad(
            lambda h, w, b, t: mean_ce(h @ w.T + b, t), argnums=(0, 1, 2))),
    }

    def run(case):
        if case["op"] in LINEAR_OPS:
            arrays = make_linear_inputs(case["rows"], case["dim"], case["classes"])
            h, w, b = (jax.device_put(jnp.asarray(a, dtype=dtypes[case["dtype"]]))
                       for a in arrays[:3])
            t = jax.device_put(jnp.asarray(arrays[3], dtype=jnp.int32))
            del arrays
            fn = fns[case["op"]]
            call = lambda: jax.block_until_ready(fn(h, w, b, t))
            return time_linear(nothing, call, max(warmup, 1), repeats)
        x_np, t_np = make_inputs(case["rows"], case["classes"])
        x = jax.device_put(jnp.asarray(x_np, dtype=dtypes[case["dtype"]]))
        del x_np
        x.block_until_ready()
        fn = fns[case["op"]]
        if case["op"] == "cross_entropy_grad":
            t = jax.device_put(jnp.asarray(t_np, dtype=jnp.int32))
            call = lambda: jax.block_until_ready(fn(x, t))
        else:
            call = lambda: jax.block_until_ready(fn(x))
        return time_calls(nothing, call, max(warmup, 1), repeats)

    return info, run


# --------------------------------------------------------------------------------------------
# Driver


def child(framework: str, cases: list[dict], threads: int, warmup: int, repeats: int,
          pinning: dict) -> None:
    """Runs every case in this process, for one framework (threads already pinned), printing
    JSON lines: one {"kind": "info"} line, then one {"kind": "result"} line per case, flushed
    as they come (a crash part-way keeps the cases before it)."""

    def emit(obj):
        print(json.dumps(obj), flush=True)

    try:
        if framework == "jax":
            info, run = jax_bench(cases, threads, warmup, repeats)
        else:
            ops = {"lse.torch": "lse", "torch.lce": "lce"}.get(framework)
            info, run = torch_bench(cases, threads, warmup, repeats, ops=ops)
    except Exception as err:  # not installed, or does not import
        emit({"kind": "info", "available": False, "version": None, "settings": pinning,
              "error": f"{type(err).__name__}: {err}"})
        return
    info["settings"].update(pinning)
    emit(dict(info, kind="info", available=True, error=None))
    for case in cases:
        row = dict(case, framework=framework, threads=threads, best_s=None, median_s=None,
                   gelem_s=None, gflops=None, peak_extra_bytes=None, skipped=None)
        print(f"peers.py: {framework} {case_name(case)}", file=sys.stderr, flush=True)
        try:
            timed = run(case)
            if isinstance(timed, dict):  # a linear case
                row.update(best_s=timed["best"], median_s=timed["median"],
                           gflops=flops(case) / timed["best"] / 1e9,
                           peak_extra_bytes=timed["peak_extra_bytes"])
            else:
                best, median = timed
                row.update(best_s=best, median_s=median,
                           gelem_s=case["rows"] * case["classes"] / best / 1e9)
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            row["skipped"] = f"{type(err).__name__}: {message}"[:200]
        gc.collect()
        emit(dict(row, kind="result"))


def run_child(name: str, args, cases: list[dict]) -> tuple[dict, list[dict]]:
    """Runs one framework's child process and collects its info and results; a case the child
    did not report (it crashed, or did not start) is recorded as skipped."""
    command = [sys.executable, os.path.abspath(__file__), "--child", name,
               "--threads", str(args.threads), "--cases", ",".join(map(case_name, cases)),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(command, env=framework_env(name, args.threads),
                          stdout=subprocess.PIPE, text=True)
    info = {"available": False, "version": None, "settings": {}, "error": None}
    done = {}
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a framework's own print, not ours
        if not isinstance(obj, dict):
            continue
        kind = obj.pop("kind", None)
        if kind == "info":
            info = obj
        elif kind == "result":
            done[case_name(obj)] = obj
    if proc.returncode != 0:
        note = f"child exited with status {proc.returncode}"
        info["error"] = f"{info['error']}; {note}" if info.get("error") else note
    results = []
    for case in cases:
        row = done.get(case_name(case))
        if row is None:
            row = dict(case, framework=name, threads=args.threads, best_s=None,
                       median_s=None, gelem_s=None, gflops=None, peak_extra_bytes=None,
                       skipped=info.get("error") or "not run")
        results.append(row)
    return info, results


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Time PyTorch and JAX softmax-family ops on the CPU (see the module doc).")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads (and cores) per framework [default: cores available]")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="op:ROWSxCLASSES:dtype,... [default: the project's targets table]")
    parser.add_argument("--frameworks", default="torch,jax",
                        help="comma-separated: torch, jax, lse.torch, torch.lce (the linear "
                             "op's F.linear_cross_entropy) [default: torch,jax]")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case")
    parser.add_argument("--out", help="write the JSON document here instead of stdout")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads <= 0 or args.repeats <= 0 or args.warmup < 0:
        parser.error("--threads and --repeats must be positive, --warmup not negative")
    cases = parse_cases(args.cases)

    if args.child:
        pinning = pin_threads(args.threads)
        child(args.child, cases, args.threads, args.warmup, args.repeats, pinning)
        return 0

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for name in frameworks:
        if name not in FRAMEWORKS:
            parser.error(f"unknown framework {name!r} (frameworks: {', '.join(FRAMEWORKS)})")

    doc = {"threads": args.threads, "cases": [case_name(c) for c in cases],
           "warmup": args.warmup, "repeats": args.repeats, "frameworks": {}, "results": []}
    for name in frameworks:
        # torch.lce has only the linear op.
        mine = [c for c in cases
                if c["op"] in LINEAR_OPS or name != "torch.lce"]
        if not mine:
            continue
        info, results = run_child(name, args, mine)
        doc["frameworks"][name] = info
        doc["results"].extend(results)

    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
