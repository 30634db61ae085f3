"""The `fluxion` command: dispatch only.

    fluxion generate "a red apple on a wooden table" -o apple.png                (the embedded model)
    fluxion generate "a lighthouse" -o out.png --model flux-2-klein-4b.safetensors --vae ae.safetensors --text qwen3/
    fluxion generate "a lighthouse" "a harbour" -n 2 -o out.png       -> out.png out-1.png out-2.png out-3.png
    fluxion generate "a fox" -o fox.png --model klein/ --fp8 --compile --cuda-graphs     (the fast paths)
    fluxion generate --from apple.png -o again.png --steps 8        (settings from the PNG, options override)
    fluxion edit -i cat.png -i hat.png "the cat wearing the hat" -o out.png --lora style.safetensors:0.8
    fluxion inpaint -i room.png --mask mask.png "a red sofa" -o out.png --strength 0.8
    fluxion interactive --model ...                                  (a REPL, fluxion.repl; type !help)
    fluxion eval --quick --out quick.json
    fluxion convert flux-2-klein-4b.safetensors klein/transformer --to diffusers

Options are generated from the dataclasses they fill (`options_from`): sampling flags from `fluxion.request.Request`,
fast-path flags from `fluxion.accel.AccelOptions`, `train` from `TrainConfig`, `eval` from `EvalConfig`, `data build`
from `PlanConfig`; the comment after each field is its help text. So every subcommand's --help lists its options.

Several outputs are numbered in the order prompts x images per prompt: OUT.png, OUT-1.png, ...; each PNG carries
its own prompt and seed (fluxion.metadata). Noise: by default image i of a prompt uses seed + i (its own generator,
so it can be re-made alone); `--noise diffusers` draws the whole batch from one generator as diffusers does.

Everything that can be checked without the model (sizes, steps, guidance, seed range, prompt encoding, output path,
device, fast-path combination, input images) is checked before the model loads. Errors the user can fix end as one
line on stderr and exit code 2; Ctrl-C ends with exit code 130 and no half-written file; anything else is a bug and
keeps its traceback.

CPU threads (CLI only; the library never changes them): with --threads N, N; else with OMP_NUM_THREADS set,
torch's choice; else torch's default (the physical cores) lowered to the cores not already busy, at least 1:
the CPU time other processes used on the cores this process may run on, measured from /proc/stat over the
command's own start-up (~1 s of imports), is subtracted (elsewhere: the 1-minute load average, which lags and
counts one's own finished runs). Oversubscribed cores slow a CPU generation 4-15x.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, TextIO

EXIT_USAGE = 2  # what argparse uses for bad arguments; we use it for every user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# --- options generated from dataclasses ---------------------------------------------------------------------------
class Option(NamedTuple):
    flags: tuple[str, ...]
    kwargs: dict


def opt(*flags: str, **kwargs) -> Option:
    return Option(flags, kwargs)


def field_help(cls) -> dict[str, str]:
    """{field: the comment after it} read from the class source (the one place a field is documented)."""
    import io
    import tokenize

    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = _class_source(klass)
        except (OSError, TypeError):
            continue
        current = None  # the field whose statement is being read (a formatter may wrap it over lines)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.string in names and tok.start[1] == 4 and current is None:
                current = tok.string
            elif tok.type == tokenize.COMMENT and current is not None:
                docs.setdefault(current, tok.string.lstrip("#").strip())
            elif tok.type == tokenize.NEWLINE:
                current = None
    return docs


def _class_source(klass) -> str:
    """The source of a module-level class. inspect.getsource parses its whole module into an AST to find a class
    (~50 ms per module, for every command's parser); a top-level `class Name` line found by text is enough."""
    import inspect
    import linecache
    import re

    lines = linecache.getlines(inspect.getsourcefile(klass) or "")
    starts = [i for i, line in enumerate(lines) if re.match(rf"class {klass.__name__}\b", line)]
    if len(starts) != 1:
        return inspect.getsource(klass)
    return "".join(inspect.getblock(lines[starts[0] :]))


def options_from(
    cls,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    extra: dict[str, dict] | None = None,
    keep_defaults: bool = False,
) -> list[Option]:
    """argparse options for the fields of dataclass `cls`: --field-name, type and choices from the annotation,
    help from the field's comment. Defaults are None ("not given": the dataclass default or a stored value
    applies) unless keep_defaults. `rename` maps a field to its flag (first entry of a tuple: aliases follow);
    `extra` adds or overrides argparse keywords per field."""
    rename, extra = rename or {}, extra or {}
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    out = []
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        kind = _argparse_kind(hints[f.name])
        if kind is None and f.name not in extra:
            continue  # callables, images: not command-line values
        flags = rename.get(f.name, ("--" + f.name.replace("_", "-"),))
        flags = (flags,) if isinstance(flags, str) else tuple(flags)
        has_default = f.default is not dataclasses.MISSING
        kw = {"dest": f.name, "help": docs.get(f.name, ""), **(kind or {})}
        if keep_defaults and has_default:
            kw["default"] = f.default
            if f.default not in (None, False, ()):
                kw["help"] += f" (default: {f.default})"
        else:
            kw["default"] = None
        if not has_default and f.default_factory is dataclasses.MISSING and keep_defaults:
            kw["required"] = True
        kw.update(extra.get(f.name, {}))
        out.append(Option(flags, kw))
    return out


def _argparse_kind(hint) -> dict | None:
    """argparse keywords for a type hint: bool -> a switch, Literal -> choices, X | None -> X, tuples -> lists."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": "store_true"}
    if hint in (int, float, str):
        return {"type": hint}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _argparse_kind(rest[0])
        return None
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            return {"type": args[0], "action": "append", "metavar": args[0].__name__.upper()}
        if all(a in (int, float, str) for a in args) and len(set(args)) == 1:
            return {"type": args[0], "nargs": len(args)}
    return None


def given(args: argparse.Namespace, cls, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` given on the command line (lists become tuples, as the dataclasses hold them)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.name in skip or value is None:
            continue
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


# --- shared pieces ------------------------------------------------------------------------------------------------
def output_paths(output: str | Path, count: int) -> list[Path]:
    """OUT.png, OUT-1.png, OUT-2.png, ... (the first keeps the name asked for)."""
    out = Path(output)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def check_output(output: str | Path) -> None:
    """Before anything loads: a .png name in a folder we can write to (or create)."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{output}: the output must be a .png file (the parameters go into its metadata)")
    if out.is_dir():
        raise ValueError(f"{output} is a folder; give a file name such as {out / 'image.png'}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {output}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {output}: no permission to write in {folder}")


def progress_bar() -> Callable[[int, int, float], None]:
    """A per-call progress callback on stderr: a tqdm bar with the last step's time on a terminal, otherwise
    (logs, pipes) one summary line per run."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar, elapsed = None, 0.0

    def update(step: int, total: int, seconds: float) -> None:
        nonlocal bar, elapsed
        elapsed += seconds
        if tty:
            if bar is None:
                bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
            bar.set_postfix_str(f"{seconds:.2f} s/step", refresh=False)
            bar.update(1)
        elif step == 1 and total > 1:  # logs see that denoising started (and how long a step takes)
            print(f"denoising: {total} steps, the first in {seconds:.2f} s", file=sys.stderr, flush=True)
        if step == total:
            if bar is not None:
                bar.close()
            else:
                print(
                    f"denoising: {total} steps in {elapsed:.1f} s ({elapsed / total:.2f} s/step)",
                    file=sys.stderr,
                )
            bar, elapsed = None, 0.0

    return update


def resolve_device(text: str | None):
    """A torch.device that exists on this machine, or a one-line ValueError."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: no CUDA device here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices (0-based)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"device {text!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device


class CpuUse(NamedTuple):
    """A reading of the CPU time spent so far (`cpu_use`): two readings give what other processes used between."""

    wall: float  # time.monotonic(), s
    busy: float  # CPU-seconds all processes spent on the cores this process may run on (/proc/stat)
    own: float  # CPU-seconds of this process (all its threads)


def cpu_use() -> CpuUse | None:
    """Now's `CpuUse`, or None where /proc/stat or CPU affinity is missing (macOS, Windows)."""
    try:
        cores = os.sched_getaffinity(0)
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cores:
            # user nice system idle iowait irq softirq steal ...: all but idle and iowait is busy (steal too: the
            # hypervisor gave that time to someone else); guest time is already inside user / nice.
            v = [int(x) for x in fields[:8]]
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    own = os.times()
    return CpuUse(time.monotonic(), busy / tick, own.user + own.system)


def busy_elsewhere(start: CpuUse, end: CpuUse) -> float | None:
    """Cores' worth of CPU that other processes used between two readings; None over less than 0.2 s (the
    counters tick every 10 ms)."""
    wall = end.wall - start.wall
    if wall < 0.2:
        return None
    return max(0.0, ((end.busy - start.busy) - (end.own - start.own)) / wall)


def configure_threads(device, requested: int | None, since: CpuUse | None = None) -> int | None:
    """CPU threads for torch (see the module docstring); returns the number set, or None if left alone. `since`:
    a `cpu_use()` reading taken when the command started, so the cores busy with other work are those measured
    over this command's own start-up (imports); without it, the 1-minute load average."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    now = cpu_use() if since is not None else None
    busy = busy_elsewhere(since, now) if now is not None else None
    if busy is None:
        # The load average lags by a minute and counts this user's own finished runs (a 2-core generate that
        # ended 20 s ago still reads as a busy core), so it is only the fallback.
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    threads = max(1, min(torch.get_num_threads(), cores, round(cores - busy)))
    torch.set_num_threads(threads)
    return threads


def parse_lora(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (the last colon followed by a number is the scale)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = text
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: the scale must be a finite number")
    if not Path(path).is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    return path, scale


ATTENTION = ("auto", "sdpa", "cudnn", "fa3")
OFFLOAD = ("none", "model", "blocks")


def accel_from_args(args: argparse.Namespace, device):
    """(AccelOptions or None, component offload on/off) from the fast-path flags; a wrong combination for this
    device is a one-line ValueError (`AccelOptions` and its `validate`), raised before anything loads."""
    from fluxion.accel import AccelOptions

    offload = getattr(args, "offload", None) or "none"
    opts = AccelOptions(
        attention=getattr(args, "attention", None) or "auto",
        compile=bool(getattr(args, "compile", None)),
        cuda_graphs=bool(getattr(args, "cuda_graphs", None)),
        fp8=bool(getattr(args, "fp8", None)),
        weight_only=getattr(args, "weight_only", None),
        offload="blocks" if offload == "blocks" else None,
        device=str(device),
    )
    opts.validate(device)
    return (None if opts == AccelOptions(device=str(device)) else opts), offload == "model"


def load(args: argparse.Namespace, loras: list[tuple[str, float]] = ()):
    """Models from the model options (the embedded model when --model is not given), with LoRAs merged and the
    fast paths on. Options were checked by `preflight` already."""
    import torch

    from fluxion.accel import VAEAccelOptions
    from fluxion.weights.models import load_models

    # Our own progress bar is enough; transformers would add one per text-encoder load. It reads this switch
    # when first imported; importing it here just to turn the bar off would cost ~2.5 s on the embedded
    # model's path, which never imports it (text/minilm.py).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    device = args.device
    opts, offload_model = args.accel
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    models = load_models(
        args.model,
        preset=args.preset,
        vae=args.vae,
        text=args.text,
        device=device,
        dtype=dtype,
        offload=offload_model,
        accel=opts,
        # A compiled transformer waits on an eager VAE otherwise (37 vs 87 ms at 1024², BENCHMARKS.md).
        vae_accel=VAEAccelOptions(compile=True)
        if opts is not None and opts.compile and device.type == "cuda"
        else None,
        loras=loras,
    )
    if getattr(args, "prompt_cache", None):
        from fluxion.text.cache import PromptCache

        models.prompt_cache = PromptCache(args.prompt_cache)
    return models


def preflight(args: argparse.Namespace) -> None:
    """The model options checked before loading: device, threads, fast-path combination, embedded-model
    conflicts. Stores the resolved device and accel options on `args`."""
    from fluxion.weights.models import is_embedded

    if is_embedded(args.model):
        name = args.model or "fluxion-tiny"
        for flag, value in (("--vae", args.vae), ("--preset", args.preset)):
            if value is not None and not (flag == "--preset" and value == name):
                raise ValueError(
                    f"{flag} applies to a --model checkpoint; the embedded {name} brings its own "
                    f"(drop {flag}, or pass --model)"
                )
    args.device = resolve_device(args.device)
    configure_threads(args.device, getattr(args, "threads", None), getattr(args, "cpu_since", None))
    args.accel = accel_from_args(args, args.device)
    gen = getattr(args, "generator_device", None)
    if gen is not None:
        resolve_device(gen)


def build_request(args: argparse.Namespace, prompts: list[str], references=()):
    """A Request from the sampling flags; with --from, from the PNG's parameters with the flags on top."""
    from fluxion.metadata import read_params
    from fluxion.request import Request, request_from_params

    values = given(args, Request, skip=("prompt", "references"))
    if prompts:
        values["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    if getattr(args, "from_image", None):
        params = read_params(args.from_image)
        if params.get("references") and not references:
            print(
                f"note: {args.from_image} was made from {params['references']} input image(s), which a PNG "
                "does not store; pass them again (fluxion edit -i ...) or this runs from the prompt alone",
                file=sys.stderr,
            )
        if params.get("noise") == "diffusers" and params.get("batch_index", 0) > 0:
            print(
                f"note: {args.from_image} is image {params['batch_index'] + 1} of a --noise diffusers batch of "
                f"{params['batch_size']}; alone it gets the noise of the batch's first image",
                file=sys.stderr,
            )
        return request_from_params(params, references=tuple(references), **values), params
    if "prompt" not in values:
        raise ValueError("no prompt given (or --from IMAGE.png to reuse one)")
    return Request(references=tuple(references), **values), {}


def loras_for(args: argparse.Namespace, params: dict) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] as given, else the LoRAs stored in a --from PNG."""
    if args.lora:
        return [parse_lora(text) for text in args.lora]
    stored = [(item["path"], float(item["scale"])) for item in params.get("loras", [])]
    for path, _ in stored:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{args.from_image} was made with the LoRA {path}, which is not there; "
                "pass --lora with its new place"
            )
    return stored


def note_model(params: dict, models, source: str) -> None:
    made_with = params.get("model")
    if made_with and made_with != models.spec.name:
        print(
            f"note: {source} was made with {made_with}; generating with {models.spec.name}", file=sys.stderr
        )


def save_all(
    results, output: str | Path, loras=(), out: TextIO | None = None, watermark: bool = True
) -> list[Path]:
    """Each result to its numbered path (written to a temporary name, then renamed: never half a file), with the
    invisible watermark unless --no-watermark."""
    from fluxion.metadata import save_png

    paths = output_paths(output, len(results))
    for result, path in zip(results, paths):
        if loras:
            result.params["loras"] = [{"path": str(p), "scale": s} for p, s in loras]
        save_png(result, path, watermark=watermark)
        print(f"{path}  seed {result.seed}", file=out or sys.stdout)
    return paths


def terminal_preview(args: argparse.Namespace, models):
    """--preview: per-step thumbnails (the fitted latent -> RGB map on the x0 estimate) drawn in place on stderr
    (kitty / iTerm2 / sixel images, coloured blocks elsewhere); None without the flag."""
    if not getattr(args, "preview", False):
        return None
    from fluxion.sampling.preview import preview_map_for_models
    from fluxion.termimage import TerminalPreview

    pmap, term = preview_map_for_models(models, args.model), TerminalPreview(sys.stderr)

    def show(step: int, total: int, x0, h: int, w: int) -> None:
        term.show(pmap.image(x0, h, w, scale=4), caption=f"step {step}/{total}")

    return show


def upsample(args: argparse.Namespace, request, models, references=()):
    """--upsample-prompt FOLDER: rewrite each prompt with a local chat LLM; both prompts are printed and the
    original is kept in the PNG (prompt_original)."""
    folder = getattr(args, "upsample_prompt", None)
    if not folder:
        return request, None
    from fluxion.text.upsample import PromptUpsampler

    up = PromptUpsampler(folder, device=models.device)
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    done = [up(p, list(references)) for p in prompts]
    for d in done:
        print(f"upsampled prompt: {d.prompt!r} (from {d.original!r})", file=sys.stderr)
    new = [d.prompt for d in done]
    originals = {d.prompt: d.original for d in done}
    return replace(request, prompt=new[0] if isinstance(request.prompt, str) else new), originals


def with_originals(results, originals):
    """Record the user's own prompt next to the upsampled one in each result's params."""
    if originals:
        for r in results:
            r.params["prompt_original"] = originals.get(r.params["prompt"], r.params["prompt"])
    return results


def edit_size(models, references) -> tuple[int, int]:
    """Edits keep the first image's size, scaled down to what the model handles (with a note when it is)."""
    from fluxion.images import fit_size, model_pixel_range

    limit = model_pixel_range(models.spec)[1]
    size = fit_size(references[0], limit)
    w, h = references[0].size
    if size[0] * size[1] < w * h and (w * h > limit):
        print(
            f"note: the output is {size[0]}x{size[1]}: the first image ({w}x{h}) scaled to what "
            f"{models.spec.name} handles; pass -W/-H for another size",
            file=sys.stderr,
        )
    return size


# --- subcommands ----------------------------------------------------------------------------------------------------
def generate_main(args: argparse.Namespace) -> int:
    return _generate(args, [])


def verify_main(args: argparse.Namespace) -> int:
    """Exit 0 when the fluxion watermark or a C2PA manifest is found, 1 when neither is."""
    from fluxion.provenance import verify

    report = verify(args.image)
    mark = report["watermark"]
    found = "found" if mark["found"] else "not found"
    print(f"{report['file']}")
    print(f"  watermark: {found} ({mark['matching_bits']}/{mark['of']} bits match)")
    c = report["c2pa"]
    if not report["c2pa_checked"]:
        print('  c2pa: not checked (pip install "fluxion[provenance]" to read C2PA manifests)')
    elif c is None:
        print("  c2pa: no manifest")
    else:
        print(f"  c2pa: {', '.join(c['actions'])} by {', '.join(c['claim_generator'])}; model {c['model']}")
        print(f"  c2pa signer: {c['signer']}; validation: {c['validation_state']}")
    return 0 if mark["found"] or c is not None else 1


def edit_main(args: argparse.Namespace) -> int:
    from fluxion.images import load_image

    return _generate(args, [load_image(p, "reference image") for p in args.image])


def _generate(args: argparse.Namespace, refs: list) -> int:
    from fluxion.sampling.pipeline import generate

    check_output(args.output)
    request, params = build_request(args, args.prompt, refs)
    loras = loras_for(args, params)
    preflight(args)
    if (getattr(args, "gpus", None) or 1) > 1:
        return _generate_on_gpus(args, request, refs, loras)
    models = load(args, loras)
    if refs and request.width is None and request.height is None:
        width, height = edit_size(models, refs)
        request = replace(request, width=width, height=height)
    note_model(params, models, args.from_image)
    request, originals = upsample(args, request, models, refs)
    results = generate(models, request, progress=progress_bar(), preview=terminal_preview(args, models))
    save_all(with_originals(results, originals), args.output, loras, watermark=not args.no_watermark)
    return 0


def _generate_on_gpus(args: argparse.Namespace, request, refs: list, loras) -> int:
    """--gpus N: one process per GPU (sequence / CFG parallel, accel/parallel.py); rank 0's images come back."""
    from fluxion.accel.launch import cli_options, generate_on_gpus

    unsupported = [
        flag
        for flag, on in (
            ("-i (editing)", refs),
            ("--lora", loras),
            (
                "--fp8/--quant/--compile/--cuda-graphs",
                any(getattr(args, k, None) for k in ("fp8", "weight_only", "compile", "cuda_graphs")),
            ),
            ("--preview", getattr(args, "preview", False)),
            ("--upsample-prompt", getattr(args, "upsample_prompt", None)),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"--gpus > 1 does not combine with {', '.join(unsupported)} yet; drop one of them")
    results = generate_on_gpus(request, args.gpus, progress=progress_bar, **cli_options(args))
    save_all(results, args.output, watermark=not args.no_watermark)
    return 0


def inpaint_main(args: argparse.Namespace) -> int:
    from fluxion.images import load_image
    from fluxion.sampling.pipeline import inpaint

    check_output(args.output)
    source, mask = load_image(args.image, "image"), load_image(args.mask, "mask")
    refs = [load_image(args.reference, "reference image")] if args.reference else []
    request, params = build_request(args, args.prompt, refs)
    strength = args.strength if args.strength is not None else params.get("strength", 0.8)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    loras = loras_for(args, params)
    preflight(args)
    models = load(args, loras)
    note_model(params, models, args.from_image)
    results = inpaint(
        models,
        request,
        source,
        mask,
        strength,
        composite=not args.no_composite,
        progress=progress_bar(),
        preview=terminal_preview(args, models),
    )
    save_all(results, args.output, loras, watermark=not args.no_watermark)
    return 0


def interactive_main(args: argparse.Namespace, inp: TextIO | None = None, out: TextIO | None = None) -> int:
    from fluxion.repl import run_repl

    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="fluxion-"))
    keys = ("width", "height", "steps", "guidance", "seed", "allow_override", "negative_prompt", "noise")
    settings = {k: getattr(args, k, None) for k in keys}
    settings["allow_override"] = bool(settings["allow_override"])
    settings["negative_prompt"] = settings["negative_prompt"] or ""
    settings["noise"] = settings["noise"] or "fluxion"
    from fluxion.request import Request

    Request(prompt="x", **settings)  # checked before loading
    loras = [parse_lora(text) for text in args.lora or ()]
    preflight(args)
    extra = {"loras": [{"path": str(p), "scale": s} for p, s in loras]} if loras else {}
    run_repl(load(args, loras), inp or sys.stdin, out or sys.stdout, outdir, settings, progress_bar, extra)
    return 0


def convert_main(args: argparse.Namespace) -> int:
    from fluxion.weights.load import convert

    print(f"wrote {convert(args.src, args.dst, args.to)}")
    return 0


def train_main(args: argparse.Namespace) -> int:
    from fluxion.train.train import TrainConfig, run_stages, shutdown_distributed

    overrides = given(args, TrainConfig)
    configs = _recipe(Path(args.recipe), overrides)
    try:  # also under torchrun: every rank leaves its process group before the interpreter exits
        summary = run_stages(configs)
    finally:
        shutdown_distributed()
    loss = summary["final_loss"]
    loss = "n/a (no step left to run)" if loss is None else f"{loss:.4f}"
    print(f"trained {summary['steps']} steps, final loss {loss}; exported {summary['exported']}")
    return 0


def _recipe(path: Path, overrides: dict):
    """The recipe's config(s) with the command-line fields on top; a missing required field is one line."""
    from fluxion.train.recipes import load_recipe_file
    from fluxion.train.train import TrainConfig, config_from_dict

    required = [f.name for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING]
    if path.suffix == ".toml" and path.is_file():
        import tomllib

        try:
            values = {**tomllib.loads(path.read_text()), **overrides}
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML ({e})") from None
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(_missing(path, missing))
        return config_from_dict(values)
    try:
        configs = load_recipe_file(path)
    except TypeError as e:  # config() built a TrainConfig without a required field
        missing = [name for name in required if f"'{name}'" in str(e)]
        if not missing:
            raise
        raise ValueError(_missing(path, missing)) from None
    if isinstance(configs, list):
        return [replace(c, **overrides) for c in configs]
    return replace(configs, **overrides)


def _missing(path: Path, names: list[str]) -> str:
    why = {"vae": 'the frozen autoencoder\'s weights, e.g. vae = "ae.safetensors"'}
    details = "; ".join(f"{n}: {why[n]}" if n in why else n for n in names)
    flags = " ".join("--" + n.replace("_", "-") for n in names)
    return f"{path} sets no {', '.join(names)} ({details}); add it to the recipe or pass {flags}"


def train_lora_main(args: argparse.Namespace) -> int:
    """A LoRA on a folder of captioned images (image.png + image.txt), starting from a model's weights."""
    from fluxion.train.train import TrainConfig
    from fluxion.train.train import main as train
    from fluxion.weights.models import embedded_files, is_embedded, resolve_preset

    check_lora_run(Path(args.out), args.lora_rank)
    if is_embedded(args.model):
        preset = args.model or "fluxion-tiny"
        init, vae = map(str, embedded_files(preset))
        text = args.text
    else:
        model = Path(args.model)
        preset = resolve_preset(model, args.preset).name
        init, vae = str(model), args.vae or (str(model / "vae") if model.is_dir() else None)
        text = args.text or (str(model) if model.is_dir() else None)
        if vae is None:
            raise ValueError("a single transformer file needs --vae (and --text)")
    fields = given(args, TrainConfig)
    cfg = TrainConfig(
        **{
            "warmup": min(20, fields["steps"] // 10 + 1),
            "caption_dropout": 0.05,
            "log_every": 10,
            **fields,
            "model": preset,
            "data": (args.data,),
            "out": args.out,
            "vae": vae,
            "text": text,
            "init": init,
            "lora_alpha": args.lora_alpha or args.lora_rank,
        }
    )
    summary = train(cfg)
    loss = summary["final_loss"]
    print(f"LoRA written to {summary['exported']}" + ("" if loss is None else f" (final loss {loss:.4f})"))
    return 0


def check_lora_run(out: Path, rank: int) -> None:
    """Refuse an --out that holds a finished LoRA, or a checkpoint of another rank (it could not resume)."""
    if (out / "lora.safetensors").is_file():
        raise ValueError(
            f"{out} already holds a finished LoRA (lora.safetensors); choose a new --out or delete the folder"
        )
    latest = out / "checkpoint" / "latest"
    if not latest.is_file():
        return
    from torch.distributed.checkpoint import FileSystemReader

    folder = out / "checkpoint" / latest.read_text().strip()
    try:
        meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise ValueError(f"{folder} is not a readable checkpoint ({e}); choose a new --out") from None
    ranks = {m.size[0] for k, m in meta.items() if k.endswith(".lora.default.down") and hasattr(m, "size")}
    if ranks and ranks != {rank}:
        raise ValueError(
            f"{out} holds an unfinished rank-{min(ranks)} LoRA run; --rank {rank} cannot resume it: "
            f"pass --rank {min(ranks)} to continue it, or choose a new --out"
        )


def data_main(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        from fluxion.curate.tinyset.sources import fetch_sources

        fetch_sources(Path(args.dest), cache=args.cache and Path(args.cache), force=bool(args.force))
        return 0
    from fluxion.curate.tinyset.tinyset import PlanConfig, build_tinyset

    cfg = PlanConfig(**given(args, PlanConfig, skip=("limit",)))
    sizes = [_wxh(s) for s in args.sizes.split(",")] if args.sizes else [_wxh(args.resolution)]
    for size in sizes:
        out = Path(args.out) / f"{size[0]}x{size[1]}" if args.sizes else Path(args.out)
        build_tinyset(
            Path(args.sources),
            out,
            resolution=size,
            seed=args.seed,
            limit=args.limit,
            workers=args.workers or os.cpu_count() or 1,
            overwrite=bool(args.overwrite),
            config=cfg,
        )
    return 0


def _wxh(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return int(w), int(h or w)
    except ValueError:
        raise ValueError(f"a size is N or WxH, e.g. 128 or 160x96, not {text!r}") from None


def curate_main(args: argparse.Namespace) -> int:
    from fluxion.curate.cli import CurateArgs, run_curate

    return run_curate(CurateArgs(recipe=args.recipe, **given(args, CurateArgs, skip=("recipe",))))


def eval_main(args: argparse.Namespace) -> int:
    import json

    from fluxion.evaluate.run import EvalConfig, evaluate
    from fluxion.weights.models import load_models

    cfg = EvalConfig(**given(args, EvalConfig))
    if cfg.out:
        check_json_output(cfg.out)
    device = resolve_device(cfg.device)
    configure_threads(device, getattr(args, "threads", None), getattr(args, "cpu_since", None))
    models = load_models(cfg.model, preset=cfg.preset, vae=cfg.vae, text=cfg.text, device=device)
    report = evaluate(models, cfg)
    if cfg.out:
        out = Path(cfg.out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
        print(f"wrote {cfg.out} ({report['seconds']} s)")
    return 0


def check_json_output(output: str) -> None:
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"--out {output} is a folder; give a file name such as {out / 'eval.json'}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {output}: {folder} is not a folder we can write to")


# --- the command table --------------------------------------------------------------------------------------------
def model_options() -> list[Option]:
    return [
        opt(
            "--model",
            help="diffusers model folder, BFL transformer .safetensors, or an embedded model: fluxion-tiny "
            "(the default) or fluxion-tiny-base (its CFG teacher, where this build ships it)",
        ),
        opt("--preset", help="the model variant, when the files cannot tell (e.g. flux2-klein-base-4b)"),
        opt(
            "--vae", help="autoencoder (ae.safetensors or a diffusers vae/ folder) for a single-file --model"
        ),
        opt("--text", help="text-encoder folder (text_encoder/ + tokenizer/) for a single-file --model"),
        opt("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available)"),
        opt("--dtype", choices=sorted(DTYPES), help="transformer dtype (default: bf16 on GPU, fp32 on CPU)"),
        opt("--threads", type=int, help="CPU threads (default: the cores not busy with other work)"),
        opt("--prompt-cache", help="folder caching prompt embeddings (keyed by encoder identity and prompt)"),
    ]


def accel_options() -> list[Option]:
    from fluxion.accel import AccelOptions

    return options_from(
        AccelOptions,
        only=("attention", "compile", "cuda_graphs", "fp8", "weight_only", "offload"),
        rename={"weight_only": "--quant"},
        extra={
            "attention": {
                "choices": list(ATTENTION),
                "help": "attention kernel: auto (cuDNN on Hopper, else SDPA's pick), sdpa, cudnn, fa3",
            },
            "weight_only": {"help": "weight-only quantization of the transformer's Linear layers (lossy)"},
            "offload": {
                "choices": list(OFFLOAD),
                "help": "model: components on the CPU until they run; blocks: stream transformer blocks "
                "from pinned host memory (GPU); default none",
            },
            "fp8": {"help": "fp8 (e4m3, rowwise) transformer matmuls: Ada/Hopper GPUs (lossy, ~1.3x)"},
            "compile": {"help": "torch.compile each transformer block (first image pays the compile)"},
            "cuda_graphs": {"help": "replay each step as one CUDA graph (GPU; weights must stay resident)"},
        },
    )


def sampling_options(sizes: bool = True) -> list[Option]:
    from fluxion.request import Request

    skip = ("prompt", "references") + (() if sizes else ("width", "height"))
    return [
        *options_from(
            Request,
            skip=skip,
            rename={
                "width": ("-W", "--width"),
                "height": ("-H", "--height"),
                "num_images": ("-n", "--num-images"),
                "negative_prompt": ("--negative-prompt", "--negative"),
            },
            extra={
                "noise": {
                    "help": "fluxion (default): image i of a prompt uses seed + i, each its own "
                    "generator; diffusers: one draw for the whole batch from one generator (diffusers' images)"
                },
                "generator_device": {"choices": ["cpu", "cuda"]},
            },
        ),
        opt(
            "--from",
            dest="from_image",
            metavar="IMAGE.png",
            help="reuse prompt and settings of a fluxion PNG",
        ),
        opt(
            "--lora",
            action="append",
            metavar="FILE[:SCALE]",
            help="LoRA to merge (any format fluxion.lora reads), repeatable; stored in the PNG",
        ),
    ]


OUTPUT = opt(
    "-o",
    "--output",
    required=True,
    metavar="OUT.png",
    help="output PNG; more images: OUT-1.png, OUT-2.png, ... (prompts x -n)",
)
PROMPTS = opt("prompt", nargs="*", help="prompt(s); several prompts make a batch")
STUDIO = [
    opt("--no-watermark", action="store_true", help="do not embed the invisible fluxion watermark"),
    opt("--preview", action="store_true", help="show a thumbnail of every step in the terminal"),
]
UPSAMPLE = opt(
    "--upsample-prompt",
    metavar="FOLDER",
    help="rewrite the prompt first with the chat LLM in this transformers folder (both are printed)",
)


class Command(NamedTuple):
    main: Callable[[argparse.Namespace], int]
    help: str
    options: Callable[[], list[Option]]  # built when the parser is (imports stay out of `import fluxion.cli`)
    subcommands: dict | None = None  # name -> (help, options) for commands with their own subcommands


def _generate_options() -> list[Option]:
    gpus = opt("--gpus", type=int, help="GPUs for one generation (sequence / CFG parallel, one process each)")
    return [PROMPTS, OUTPUT, *sampling_options(), *model_options(), *accel_options(), *STUDIO, UPSAMPLE, gpus]


def _edit_options() -> list[Option]:
    image = opt("-i", "--image", action="append", required=True, help="reference image (repeat for several)")
    return [image, *_generate_options()]


def _inpaint_options() -> list[Option]:
    return [
        opt("-i", "--image", required=True, help="the image to repaint (the output has its size)"),
        opt("--mask", required=True, help="mask of the same size: white = repaint, black = keep"),
        opt("-r", "--reference", help="an extra reference image"),
        opt("--strength", type=float, help="how much to repaint, in (0, 1] (default: 0.8)"),
        opt("--no-composite", action="store_true", help="keep generated pixels outside the mask too"),
        PROMPTS,
        OUTPUT,
        *sampling_options(sizes=False),
        *model_options(),
        *accel_options(),
        *STUDIO,
    ]


def _interactive_options() -> list[Option]:
    keep = ("--width", "--height", "--steps", "--guidance", "--seed", "--allow-override", "--negative-prompt")
    keep += ("--noise", "--lora")
    return [
        opt("--outdir", help="where outputs go (default: a new temporary folder)"),
        *[o for o in sampling_options() if set(o.flags) & set(keep)],
        *model_options(),
        *accel_options(),
    ]


def _train_options() -> list[Option]:
    from fluxion.train.train import TrainConfig

    return [
        opt("recipe", help="a .toml file of TrainConfig fields or a .py file defining config() / stages()"),
        *options_from(TrainConfig),  # each given flag overrides the recipe's value
    ]


def _train_lora_options() -> list[Option]:
    from fluxion.train.train import TrainConfig

    return [
        opt("--data", required=True, help="folder of images + .txt captions"),
        opt("--out", required=True, help="run folder (lora.safetensors is written there)"),
        opt("--model", help="base model (default: the embedded fluxion-tiny)"),
        opt("--preset", help="preset name when it cannot be read off the checkpoint"),
        opt("--vae", help="autoencoder weights (for a single-file --model)"),
        opt("--text", help="text-encoder folder (for a single-file --model)"),
        *options_from(
            TrainConfig,
            only=("lora_rank", "lora_alpha", "steps", "batch_size", "lr", "seed", "sample_every"),
            rename={"lora_rank": ("--rank", "--lora-rank"), "lora_alpha": ("--alpha", "--lora-alpha")},
            extra={
                "lora_rank": {"default": 16, "help": "LoRA rank (default 16)"},
                "steps": {"default": 300, "help": "optimizer steps (default 300)"},
                "batch_size": {"default": 4, "help": "images per step (default 4)"},
                "lr": {"default": 1e-3, "help": "learning rate (default 1e-3)"},
                "seed": {"default": 0},
            },
        ),
    ]


def _curate_options() -> list[Option]:
    from fluxion.curate.cli import CurateArgs

    return [
        opt("recipe", help="a .toml recipe (see README: Curating data)"),
        *options_from(CurateArgs, skip=("recipe",)),
    ]


def _eval_options() -> list[Option]:
    from fluxion.evaluate.run import EvalConfig

    return [
        *options_from(EvalConfig, keep_defaults=True),
        opt("--threads", type=int, help="CPU threads (default: the cores not busy with other work)"),
    ]


def _data_fetch_options() -> list[Option]:
    return [
        opt("dest", help="folder for the raw sources"),
        opt("--cache", help="keep the npm tarballs here between runs"),
        opt("--force", action="store_true", help="redo every part even when up to date"),
    ]


def _data_build_options() -> list[Option]:
    from fluxion.curate.tinyset.tinyset import PlanConfig

    return [
        opt("sources", help="a folder written by `fluxion data fetch`"),
        opt("out", help="output folder"),
        opt("--resolution", default="128", help="N or WxH (default 128)"),
        opt("--sizes", help="comma-separated WxH list, e.g. 128x128,160x96: one OUT/WxH folder each"),
        opt("--seed", type=int, default=0, help="the dataset's seed (default 0)"),
        opt("--workers", type=int, default=0, help="render processes (0: one per CPU)"),
        opt("--overwrite", action="store_true", help="replace an existing OUT"),
        *options_from(PlanConfig),
    ]


def _convert_options() -> list[Option]:
    return [
        opt("src", help="a BFL .safetensors file or a diffusers component folder"),
        opt("dst", help="a .safetensors file (--to bfl) or a folder (--to diffusers)"),
        opt("--to", required=True, choices=["bfl", "diffusers"], help="the layout to write"),
    ]


COMMANDS: dict[str, Command] = {
    "generate": Command(generate_main, "text to image", _generate_options),
    "edit": Command(edit_main, "image(s) + prompt to image", _edit_options),
    "inpaint": Command(inpaint_main, "repaint the white part of a mask", _inpaint_options),
    "interactive": Command(
        interactive_main,
        "a prompt loop: $N reuses earlier outputs, !help lists commands",
        _interactive_options,
    ),
    "train": Command(
        train_main,
        "train from a recipe (options override its fields); for several GPUs: "
        "torchrun --nproc_per_node N -m fluxion.train.train RECIPE",
        _train_options,
    ),
    "train-lora": Command(
        train_lora_main,
        "train a LoRA on a folder of images with same-named .txt captions",
        _train_lora_options,
    ),
    "data": Command(
        data_main,
        "build the fluxion-tiny training set: fetch (needs the package registries), then build (offline)",
        list,
        {
            "fetch": ("download the raw sources (npm + Debian registries)", _data_fetch_options),
            "build": ("build the training set from a sources folder (offline)", _data_build_options),
        },
    ),
    "curate": Command(
        curate_main,
        "curate raw images into training shards from a TOML recipe: filters, dedup, captions, report",
        _curate_options,
    ),
    "eval": Command(
        eval_main,
        "evaluate a model (default: the embedded fluxion-tiny): OCR typography, colour, recognisability, "
        "editing, speed; prints figures and writes JSON",
        _eval_options,
    ),
    "verify": Command(
        verify_main,
        "check an image for the fluxion watermark and a C2PA manifest (exit 1 when neither is found)",
        lambda: [opt("image", help="the image file (PNG, JPEG or WebP)")],
    ),
    "convert": Command(
        convert_main,
        "convert a transformer or VAE checkpoint between the BFL and diffusers layouts",
        _convert_options,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` the options of that one command (the others keep their name and help):
    building every command's options imports the trainer, curation and evaluation modules (~0.2 s of a cold
    `fluxion generate` on 2 cores) for flags that this run cannot be given."""
    from fluxion import __version__

    parser = argparse.ArgumentParser(prog="fluxion", description="FLUX.2 image generation and editing")
    parser.add_argument("--version", action="version", version=f"fluxion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.set_defaults(main=command.main)
        if only is not None and name != only:
            continue
        _add(p, command.options())
        if command.subcommands:
            nested = p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")
            for sub_name, (sub_help, sub_options) in command.subcommands.items():
                _add(nested.add_parser(sub_name, help=sub_help, description=sub_help), sub_options())
    return parser


def _add(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    for option in options:
        parser.add_argument(*option.flags, **option.kwargs)


# --- entry point --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`fluxion ARGS` (argv None: this process's own command line) -> exit code."""
    if argv is not None:
        return _main(argv)
    try:
        return _main(sys.argv[1:], process=True)
    finally:
        # The process ends next. Python's shutdown runs full garbage collections over every object left, and
        # torch alone leaves ~10^6 (0.4-0.9 s of a cold `fluxion generate` on 2 cores); frozen objects are
        # skipped. Outputs are written and closed by now; atexit handlers and weakref finalizers still run
        # (only cyclic garbage is left to the OS). Not done for in-process callers (argv given: tests).
        gc.freeze()


def _main(argv: list[str], process: bool = False) -> int:
    if argv[:1] in (["serve"], ["keys"]):  # fluxion/serve/cli.py
        return __import__("fluxion.serve.cli").serve.cli.dispatch(argv)
    started = cpu_use()  # what other processes use of the CPU is measured from here (configure_threads)
    if process:
        # Building the parser imports torch: ~10^6 objects that live as long as the process. Collecting while
        # they are created walks them again and again (~0.15 s on 2 cores), and every later full collection
        # would walk them once more; they are frozen instead (this process's own command line only).
        gc.disable()
    args = build_parser(argv[0] if argv[:1] and argv[0] in COMMANDS else None).parse_args(argv)
    if process:
        gc.freeze()
        gc.enable()
    args.cpu_since = started

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        kind = "note" if issubclass(category, Note) else "warning"
        print(f"fluxion {args.command}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)

    from PIL import UnidentifiedImageError

    from fluxion.request import Note

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", Note)  # a note per call, not once per process (the REPL repeats)
            warnings.showwarning = one_line_warning
            return args.main(args)
    except KeyboardInterrupt:
        print(f"\nfluxion {args.command}: interrupted (nothing half-written is left)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, OSError, UnidentifiedImageError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fluxion {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
