"""`fluxion interactive`: a prompt loop in the spirit of flux2.c's interactive mode.

Outputs are numbered $1, $2, ...; a line starting with $N tokens edits with those images as references. The loop
survives everything a user can do wrong: a bad command, a missing or oversized image (one `error:` line), and
Ctrl-C, which stops the generation running (or clears the line being typed) and returns to the prompt; Ctrl-D or
!quit ends it.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

REPL_HELP = """\
  PROMPT               generate from text
  $N ... PROMPT        edit: earlier outputs as references ($ alone = the last one), e.g. $1 $3 put them together
  !edit $N ... PROMPT  the same, spelled out
  WxH PROMPT           this one at another size, e.g. 512x384 a lighthouse at dusk
  !load PATH           add an image file as the next $N
  !seed N|random       a fixed seed for what follows, or random again (the seed used is always printed)
  !size WxH   !steps N|auto   !guidance G|auto   !show (current settings)
  !view [$N]           draw the last image (or $N) in the terminal (kitty / iTerm2 / sixel / colour blocks)
  Ctrl-C stops a generation (the session goes on)
  !help   !quit (or Ctrl-D)"""
_SIZE = re.compile(r"(\d+)x(\d+)")


def _lines(inp: TextIO, out: TextIO) -> Iterator[str]:
    tty = inp is sys.stdin and inp.isatty()
    while True:
        try:
            line = input("fluxion> ") if tty else inp.readline()  # input(): line editing and history
        except EOFError:
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print("", file=out)
            continue
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
    from fluxion.images import check_size

    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"a size is WIDTHxHEIGHT, e.g. 512x512, not {text!r}")
    check_size(int(m[1]), int(m[2]))  # checked now rather than at the next generation
    return int(m[1]), int(m[2])


def run_repl(
    models,
    inp: TextIO,
    out: TextIO,
    outdir: Path,
    settings: dict,
    progress: Callable[[], Callable] | None = None,
    extra_params: dict | None = None,
) -> list[Path]:
    """Read commands and prompts line by line from `inp`; outputs go to `outdir` as $1, $2, ... (returned).
    `settings`: Request fields (width, height, steps, guidance, seed, ...); `progress`: a factory of per-call
    progress callbacks; `extra_params`: stored in every PNG too (e.g. the LoRAs merged into the model)."""
    from fluxion.images import fit_size, load_image, model_pixel_range
    from fluxion.metadata import save_png
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    images: list[Path] = []
    print(f"fluxion interactive: {models.spec.name}, outputs in {outdir}; !help for commands", file=out)
    for line in _lines(inp, out):
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
                seed = None if rest == "random" else _number(rest, int, "!seed")
                Request(prompt="x", seed=seed)  # the range check, now
                settings["seed"] = seed
            elif cmd == "!size":
                settings["width"], settings["height"] = _size(rest)
            elif cmd == "!steps":
                steps = _number(rest, int, "!steps")
                Request(prompt="x", steps=steps)
                settings["steps"] = steps
            elif cmd == "!guidance":
                guidance = _number(rest, float, "!guidance")
                Request(prompt="x", guidance=guidance)
                settings["guidance"] = guidance
            elif cmd == "!view":
                from fluxion.termimage import TerminalPreview

                if not images:
                    raise ValueError("no image yet")
                token = rest or "$"
                index = len(images) if token == "$" else int(token[1:]) if token[1:].isdigit() else 0
                if not 1 <= index <= len(images):
                    raise ValueError(f"no image {token} (there are {len(images)})")
                TerminalPreview(out).show(
                    load_image(images[index - 1]), caption=f"${index} {images[index - 1]}"
                )
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
                    size = fit_size(refs[0], model_pixel_range(models.spec)[1])
                fields = {k: v for k, v in settings.items() if k not in ("width", "height")}
                request = Request(
                    prompt=text, width=size[0], height=size[1], references=tuple(refs), **fields
                )
                start = time.perf_counter()
                result = generate(models, request, progress=progress() if progress else None)[0]
                result.params.update(extra_params or {})
                path = save_png(result, outdir / f"image-{len(images) + 1:04d}.png", watermark=True)
                images.append(path)
                w, h = result.image.size
                took = time.perf_counter() - start
                print(f"${len(images)} {path}  seed {result.seed}  {w}x{h}  {took:.1f}s", file=out)
        except KeyboardInterrupt:  # Ctrl-C during a generation: stop it, keep the session
            print("interrupted; nothing saved", file=out)
        except (ValueError, OSError) as e:  # the REPL's outermost handler: report and keep the session
            print(f"error: {' '.join(str(e).split())}", file=out)
    return images
