"""The README's first command, cold, phase by phase (issue 14's CPU goal: a whole cold generate <= 2 s on 2 cores).

    python benchmarks/bench_cold_generate.py [--runs 5] [--out DIR] [--src SRC] [--compare SRC] [-- CLI ARGS]

Each run starts two fresh processes, interleaved so both see the same machine load:

- `command`: `python -m fluxion.cli generate "a red heart" -o OUT --seed I [CLI ARGS]`, wall clock from spawn to
  exit (what a user waits for; the README's figure).
- `phases`: this script with `--child`, which imports the generate path, then runs the same `fluxion.cli.main`
  with timers wrapped around the functions of each phase (patched on their modules, so the CLI's own code runs
  unchanged). Times are exclusive: a phase nested in another (accel inside load, watermark inside save) is
  subtracted from its parent. `interpreter` is spawn -> first line of this script (Python start-up, site);
  `exit` is main() returned -> process gone (interpreter and torch teardown); `other` is whatever in main() no
  wrapped function covers (output path checks, request building, printing).

Wrapped functions that a checkout lacks are skipped, so `--src` can time an older commit's tree the same way
(e.g. `git worktree add /tmp/old <commit>`, then `--src /tmp/old/src`); `--compare SRC` times a second tree in
alternation with the first (run i of both back to back), the fair comparison on a machine whose load changes.
The figures to compare are the minimum over runs (least disturbed); medians are reported too. The CLI picks its
CPU threads from the load (cli.configure_threads): set OMP_NUM_THREADS (or pass `-- --threads N`) to compare at
equal threads. Writes `bench_cold_generate.json` under --out (default bench_out/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (module, attribute, phase). Order is the order the phases run in; nesting is handled by the exclusive timer.
WRAPPED = [
    ("fluxion.cli", "build_parser", "parse args"),
    ("fluxion.cli", "preflight", "preflight (device, threads)"),
    ("fluxion.cli", "load", "load"),
    ("fluxion.weights.load", "load_transformer", "load: transformer"),
    ("fluxion.weights.models", "load_vae", "load: vae"),
    ("fluxion.sampling.pipeline", "load_vae", "load: vae"),  # older trees
    ("fluxion.text.encoder", "load_text_encoder", "load: text encoder"),
    ("fluxion.weights.models", "Models.accelerate", "load: accel"),
    ("fluxion.sampling.pipeline", "_warn_long_prompts", "prompt length check"),
    ("fluxion.sampling.pipeline", "draw_noise", "noise"),
    ("fluxion.sampling.pipeline", "encode_prompts", "text encode"),
    ("fluxion.sampling.pipeline", "_run", "denoise"),
    ("fluxion.sampling.pipeline", "decode", "decode"),
    ("fluxion.sampling.pipeline", "pixels_to_pil", "to PIL"),
    ("fluxion.provenance", "watermark_if_possible", "watermark"),
    ("fluxion.metadata", "save_png", "save (PNG + metadata)"),
]
# Imported up front in the child and timed as "import": the modules the generate path always needs. What a
# phase imports lazily (tokenizers, the watermark package) stays in that phase.
IMPORTS = [
    "fluxion.cli",
    "torch",
    "fluxion.sampling.pipeline",
    "fluxion.weights.models",
    "fluxion.accel",
    "fluxion.metadata",
]


def child(out: Path, cli_args: list[str]) -> None:
    t_enter, cpu_enter = time.time(), time.process_time()
    wall: dict[str, float] = {}  # phase -> exclusive wall seconds
    cpu: dict[str, float] = {}  # phase -> exclusive CPU seconds of this process (all threads)
    stack: list[list[float]] = []  # [wall start, cpu start, wall in nested phases, cpu in nested phases]
    info: dict = {}

    def add(name: str, w: float, c: float) -> None:
        wall[name], cpu[name] = wall.get(name, 0.0) + w, cpu.get(name, 0.0) + c

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            if name == "denoise":
                import torch

                info["torch_threads"] = torch.get_num_threads()
            stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                w0, c0, w_in, c_in = stack.pop()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                add(name, w - w_in, c - c_in)
                if stack:
                    stack[-1][2] += w
                    stack[-1][3] += c

        wrapper.__wrapped__ = fn
        return wrapper

    w0, c0 = time.perf_counter(), time.process_time()
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    add("import", time.perf_counter() - w0, time.process_time() - c0)
    for mod_name, attr, phase in WRAPPED:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        owner, _, leaf = attr.rpartition(".")
        target = getattr(mod, owner, None) if owner else mod
        if target is not None and hasattr(target, leaf):
            setattr(target, leaf, timed(getattr(target, leaf), phase))
    import fluxion.cli

    sys.argv = ["fluxion", *cli_args]  # main() without argv: as the console script runs it
    w0, c0 = time.perf_counter(), time.process_time()
    rc = fluxion.cli.main()
    main_w, main_c = time.perf_counter() - w0, time.process_time() - c0
    t_end, cpu_end = time.time(), time.process_time()
    add(
        "other",
        main_w - sum(v for k, v in wall.items() if k != "import"),
        main_c - sum(v for k, v in cpu.items() if k != "import"),
    )
    report = dict(rc=rc, t_enter=t_enter, t_end=t_end, cpu_enter=cpu_enter, cpu_end=cpu_end, **info)
    out.write_text(json.dumps(dict(report, wall=wall, cpu=cpu)))


def run_once(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(launch time, exit time, CPU seconds the process used) of one run of `cmd`."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_launch = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    t_gone = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return t_launch, t_gone, (after.ru_utime + after.ru_stime) - (used.ru_utime + used.ru_stime)


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}


def time_tree(src: str | None, prompt: str, cli_args: list[str], tmp: Path, tag: str) -> dict:
    """One cold command and one phased run per call of `step`, for the checkout whose src/ is `src`."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    state = {"src": src or "importable fluxion", "command": [], "command_cpu": [], "wall": [], "cpu": []}

    def step(i: int) -> None:
        out = tmp / f"{tag}-{i}.png"
        gen = ["generate", prompt, "-o", str(out), "--seed", str(i), *cli_args]
        t_launch, t_gone, used = run_once([sys.executable, "-m", "fluxion.cli", *gen], env)
        state["command"].append(t_gone - t_launch)
        state["command_cpu"].append(used)
        path = tmp / f"{tag}-phases-{i}.json"
        t_launch, t_gone, used = run_once([sys.executable, __file__, "--child", str(path), "--", *gen], env)
        r = json.loads(path.read_text())
        wall = {"interpreter": r["t_enter"] - t_launch, **r["wall"], "exit": t_gone - r["t_end"]}
        wall["total"] = t_gone - t_launch
        # CPU before the first line and after main() returned: the process's total minus what it measured.
        cpu = {"interpreter": r["cpu_enter"], **r["cpu"], "exit": used - r["cpu_end"], "total": used}
        state["wall"].append(wall)
        state["cpu"].append(cpu)
        state.setdefault("threads", []).append(r.get("torch_threads"))
        print(
            f"{tag} run {i}: command {state['command'][-1]:.2f} s; phased {wall['total']:.2f} s, "
            f"{used:.2f} CPU-s ({r.get('torch_threads')} threads, load average {os.getloadavg()[0]:.2f})",
            file=sys.stderr,
        )

    state["step"] = step
    return state


def report_of(state: dict) -> dict:
    names = list(dict.fromkeys(k for p in state["wall"] for k in p))
    return dict(
        src=state["src"],
        command_s=summary(state["command"]),
        command_cpu_s=summary(state["command_cpu"]),
        phases_s={k: summary([p.get(k, 0.0) for p in state["wall"]]) for k in names},
        phases_cpu_s={k: summary([p.get(k, 0.0) for p in state["cpu"]]) for k in names},
        torch_threads=state["threads"],
        raw=dict(
            command_s=[round(c, 3) for c in state["command"]],
            command_cpu_s=[round(c, 3) for c in state["command_cpu"]],
            phases_s=state["wall"],
            phases_cpu_s=state["cpu"],
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--src", help="the src/ folder of another checkout to time instead of the importable one")
    ap.add_argument(
        "--compare", help="the src/ folder of a second checkout, timed in alternation with the first"
    )
    ap.add_argument("--prompt", default="a red heart")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("cli_args", nargs="*", help="extra `fluxion generate` options (after --)")
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child), args.cli_args)

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": time_tree(args.src, args.prompt, args.cli_args, Path(tmp), "this")}
        if args.compare:
            trees["compare"] = time_tree(args.compare, args.prompt, args.cli_args, Path(tmp), "compare")
        for i in range(args.runs):
            for state in trees.values():
                state["step"](i)
    reports = {k: report_of(v) for k, v in trees.items()}
    result = dict(
        cpu_count=os.cpu_count(),
        python=sys.version.split()[0],
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        cli_args=args.cli_args,
        runs=args.runs,
        **reports["this"],
        **({"compare": reports["compare"]} if args.compare else {}),
    )
    path = Path(args.out) / "bench_cold_generate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    names = list(dict.fromkeys(k for r in reports.values() for k in r["phases_s"]))
    head = "".join(f"{k + ' wall min':>17s}{'med':>7s}{'CPU min':>9s}" for k in reports)
    print(f"{'phase (s)':28s}{head}")
    none = {"min": 0.0, "median": 0.0}
    rows = [("whole command", [(r["command_s"], r["command_cpu_s"]) for r in reports.values()])]
    rows += [
        (n, [(r["phases_s"].get(n, none), r["phases_cpu_s"].get(n, none)) for r in reports.values()])
        for n in names
    ]
    for name, cells in rows:
        print(f"{name:28s}" + "".join(f"{w['min']:17.3f}{w['median']:7.3f}{c['min']:9.3f}" for w, c in cells))
    for k, r in reports.items():
        print(f"{k}: {r['src']}; torch threads {r['torch_threads']}")
    print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
