"""Raw sources of the fluxion-tiny dataset: ``fetch_sources`` (needs the npm and Debian registries) and
``load_sources`` (offline, used by the build).

The sources folder is small enough (about 20 MB) to travel with the repository to a machine without a
network. Layout::

    manifest.json              what was fetched: package versions, sha256 of tarballs and files, licenses
    emoji/emoji.json           emoji-datasource records, trimmed to the fields the build uses
    emoji/labels.json          CLDR short names and keywords from emojibase-data, keyed by unified code
    emoji/<vendor>-64.npy.xz   uint8 [N, 64, 64, 4] RGBA images, an .npy file compressed with xz (LZMA)
    emoji/<vendor>-64.json     {"names": [...file names in array order], "license", "source", "attribution"}
    fonts/*.ttf|*.otf          font files copied from Debian packages
    fonts/fonts.json           one record per font: file, family, style, weight, license, package, version
    licenses/                  upstream LICENSE files, the image-license section of the emoji-data README,
                               and the Debian copyright file of each font package

Why pack the images instead of copying the PNGs: the 2 x 3,786 PNGs are 24 MB (40 MB on disk with
block overhead), while one xz-compressed array per vendor is 6.7 MB, because LZMA sees the
near-identical skin-tone variants side by side. The packing is lossless except that RGB is zeroed
where alpha is 0, which changes no composited pixel.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT_VERSION = 1

# npm package -> version. The images of the two vendor packages are all we take from them.
NPM_PACKAGES: dict[str, str] = {
    "emoji-datasource": "16.0.0",
    "emoji-datasource-google": "16.0.0",
    "emoji-datasource-twitter": "16.0.0",
    "emojibase-data": "17.0.0",
}

# Apple and Facebook images are left out on purpose: Apple's are "not licensed for commercial usage" and
# Facebook's "have no clear licensing" (emoji-datasource README).
VENDORS: dict[str, dict[str, str]] = {
    "google": {
        "package": "emoji-datasource-google",
        "license": "Apache-2.0",
        "attribution": "Noto Emoji by Google, Apache License 2.0",
    },
    "twitter": {
        "package": "emoji-datasource-twitter",
        "license": "CC-BY-4.0",
        "attribution": "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0",
    },
}


@dataclass(frozen=True)
class FontSpec:
    file: str
    package: str  # Debian package
    dir: str  # under /usr/share/fonts
    family: str
    style: str  # caption word(s): "sans-serif", "serif", "monospace", ...
    weight: str
    license: str  # SPDX


_DEJAVU = ("fonts-dejavu-core", "truetype/dejavu")
_LIB = ("fonts-liberation2", "truetype/liberation2")
_NOTO = ("fonts-noto-core", "truetype/noto")
FONTS: tuple[FontSpec, ...] = (
    FontSpec("DejaVuSans-Bold.ttf", *_DEJAVU, "DejaVu Sans", "sans-serif", "bold", "Bitstream-Vera"),
    FontSpec("DejaVuSerif-Bold.ttf", *_DEJAVU, "DejaVu Serif", "serif", "bold", "Bitstream-Vera"),
    FontSpec("DejaVuSansMono-Bold.ttf", *_DEJAVU, "DejaVu Sans Mono", "monospace", "bold", "Bitstream-Vera"),
    FontSpec("LiberationSans-Bold.ttf", *_LIB, "Liberation Sans", "sans-serif", "bold", "OFL-1.1"),
    FontSpec("LiberationSans-Regular.ttf", *_LIB, "Liberation Sans", "sans-serif", "regular", "OFL-1.1"),
    FontSpec("LiberationSerif-Bold.ttf", *_LIB, "Liberation Serif", "serif", "bold", "OFL-1.1"),
    FontSpec("LiberationSerif-Regular.ttf", *_LIB, "Liberation Serif", "serif", "regular", "OFL-1.1"),
    FontSpec("LiberationSerif-BoldItalic.ttf", *_LIB, "Liberation Serif", "italic serif", "bold", "OFL-1.1"),
    FontSpec("NotoSans-Bold.ttf", *_NOTO, "Noto Sans", "sans-serif", "bold", "OFL-1.1"),
    FontSpec("NotoSerif-Bold.ttf", *_NOTO, "Noto Serif", "serif", "bold", "OFL-1.1"),
    FontSpec(
        "OpenSans-Bold.ttf",
        "fonts-open-sans",
        "truetype/open-sans",
        "Open Sans",
        "sans-serif",
        "bold",
        "Apache-2.0",
    ),
    FontSpec("Lato-Black.ttf", "fonts-lato", "truetype/lato", "Lato", "sans-serif", "black", "OFL-1.1"),
    FontSpec("Lato-Regular.ttf", "fonts-lato", "truetype/lato", "Lato", "sans-serif", "regular", "OFL-1.1"),
    FontSpec(
        "Cantarell-Bold.otf",
        "fonts-cantarell",
        "opentype/cantarell",
        "Cantarell",
        "sans-serif",
        "bold",
        "OFL-1.1",
    ),
    FontSpec(
        "ComicNeue-Bold.otf",
        "fonts-comic-neue",
        "opentype/comic-neue",
        "Comic Neue",
        "casual handwritten-style",
        "bold",
        "OFL-1.1",
    ),
    FontSpec(
        "Hack-Bold.ttf", "fonts-hack", "truetype/hack", "Hack", "monospace", "bold", "MIT AND Bitstream-Vera"
    ),
)

# emoji-datasource fields the build uses (the rest of the 1.3 MB file is vendor code points and sheet
# coordinates).
_EMOJI_FIELDS = (
    "name",
    "unified",
    "image",
    "short_names",
    "category",
    "subcategory",
    "sort_order",
    "added_in",
)


# ---------------------------------------------------------------------------------------------------------
# Reading (offline)


@dataclass(frozen=True)
class Font:
    path: Path
    family: str
    style: str
    weight: str
    license: str


@dataclass(frozen=True)
class Sources:
    root: Path
    manifest: dict
    emoji: list[dict]  # emoji-datasource records (trimmed or full)
    labels: dict[str, dict]  # unified code -> {"label": str, "tags": [...]}; may be empty
    vendors: dict[str, dict]  # vendor -> pack index json (names, license, ...); only vendors present
    fonts: list[Font]


def load_sources(root: Path) -> Sources:
    """Read and check a sources folder made by ``fetch_sources`` (or by hand, e.g. in tests)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sources folder {root} does not exist; create it with "
            f"`python -m fluxion.curate.tinyset.tinyset fetch {root}` on a machine that reaches npm and Debian"
        )
    emoji_json = root / "emoji" / "emoji.json"
    if not emoji_json.is_file():
        raise FileNotFoundError(
            f"{emoji_json} is missing: {root} is not a complete sources folder (run fetch)"
        )
    emoji = json.loads(emoji_json.read_text())
    labels_path = root / "emoji" / "labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    vendors = {}
    for vendor in VENDORS:
        index = root / "emoji" / f"{vendor}-64.json"
        if index.is_file() and (root / "emoji" / f"{vendor}-64.npy.xz").is_file():
            vendors[vendor] = json.loads(index.read_text())
    if not vendors:
        raise FileNotFoundError(f"no emoji image pack (emoji/<vendor>-64.npy.xz + .json) in {root}")
    fonts = _load_fonts(root / "fonts")
    if not fonts:
        raise FileNotFoundError(f"no font files (*.ttf, *.otf) in {root / 'fonts'}")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return Sources(root, manifest, emoji, labels, vendors, fonts)


def _load_fonts(font_dir: Path) -> list[Font]:
    if not font_dir.is_dir():
        return []
    index = font_dir / "fonts.json"
    if index.is_file():
        return [
            Font(font_dir / r["file"], r["family"], r["style"], r["weight"], r["license"])
            for r in json.loads(index.read_text())
        ]
    # No index (a hand-made folder): guess the style from the file name.
    fonts = []
    for p in sorted([*font_dir.glob("*.ttf"), *font_dir.glob("*.otf")]):
        low = p.stem.lower()
        style = "monospace" if "mono" in low else "serif" if "serif" in low else "sans-serif"
        fonts.append(Font(p, p.stem.split("-")[0], style, "bold" if "bold" in low else "regular", "unknown"))
    return fonts


def load_emoji_pack(root: Path, vendor: str) -> dict[str, np.ndarray]:
    """image file name (e.g. '1f385.png') -> uint8 [64, 64, 4] RGBA."""
    index = json.loads((Path(root) / "emoji" / f"{vendor}-64.json").read_text())
    raw = lzma.decompress((Path(root) / "emoji" / f"{vendor}-64.npy.xz").read_bytes())
    arr = np.load(io.BytesIO(raw))
    assert arr.ndim == 4 and arr.shape[0] == len(index["names"]) and arr.shape[-1] == 4, arr.shape
    return dict(zip(index["names"], arr))


def write_emoji_pack(dest: Path, vendor: str, images: dict[str, np.ndarray], *, source: str = "") -> dict:
    """Write ``images`` (name -> RGBA uint8 [S, S, 4]) as ``dest/emoji/<vendor>-64.npy.xz`` + index json."""
    names = sorted(images)
    arr = np.stack([images[n] for n in names]).astype(np.uint8)
    arr[arr[..., 3] == 0, :3] = 0  # invisible colour: drop it, it only costs bytes
    buf = io.BytesIO()
    np.save(buf, arr)
    out = Path(dest) / "emoji"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{vendor}-64.npy.xz").write_bytes(lzma.compress(buf.getvalue(), preset=6))
    index = {
        "names": names,
        "shape": list(arr.shape),
        "license": VENDORS[vendor]["license"],
        "attribution": VENDORS[vendor]["attribution"],
        "source": source,
    }
    (out / f"{vendor}-64.json").write_text(json.dumps(index))
    return index


# ---------------------------------------------------------------------------------------------------------
# Fetching (registries)


def fetch_sources(dest: Path, *, cache: Path | None = None, force: bool = False, log=print) -> dict:
    """Download the raw sources into ``dest`` and return its manifest. Re-runnable: parts whose
    versions match the manifest are kept. ``cache`` keeps the npm tarballs (about 170 MB) between runs.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() and not force else {}
    manifest = {"format": FORMAT_VERSION, "packages": {}, "fonts": [], "files": {}}
    with tempfile.TemporaryDirectory(prefix="fluxion-fetch-") as tmp:
        work = Path(cache) if cache is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tarballs: dict[str, Path] = {}

        def tarball(pkg: str) -> Path:
            if pkg not in tarballs:
                tarballs[pkg] = _npm_pack(pkg, NPM_PACKAGES[pkg], work, log)
            return tarballs[pkg]

        def up_to_date(pkg: str, files: list[str]) -> bool:
            prev = old.get("packages", {}).get(pkg)
            ok = (
                bool(prev)
                and prev["version"] == NPM_PACKAGES[pkg]
                and all((dest / f).is_file() for f in files)
            )
            if ok:
                manifest["packages"][pkg] = prev
                log(f"  {pkg}@{NPM_PACKAGES[pkg]}: up to date")
            return ok

        files = [
            "emoji/emoji.json",
            "licenses/emoji-datasource.LICENSE",
            "licenses/emoji-datasource.README-license.md",
        ]
        if not up_to_date("emoji-datasource", files):
            manifest["packages"]["emoji-datasource"] = _extract_emoji_json(tarball("emoji-datasource"), dest)
        if not up_to_date("emojibase-data", ["emoji/labels.json", "licenses/emojibase-data.LICENSE"]):
            manifest["packages"]["emojibase-data"] = _extract_labels(tarball("emojibase-data"), dest)
        for vendor, info in VENDORS.items():
            pkg = info["package"]
            if not up_to_date(pkg, [f"emoji/{vendor}-64.npy.xz", f"emoji/{vendor}-64.json"]):
                manifest["packages"][pkg] = _extract_vendor_pack(tarball(pkg), vendor, dest, log)
        manifest["fonts"] = _copy_fonts(dest, work, log)

    # Every file, with its size and hash, so a copy can be checked after travelling.
    total = 0
    for p in sorted(dest.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = p.relative_to(dest).as_posix()
            manifest["files"][rel] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            total += p.stat().st_size
    manifest["total_bytes"] = total
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"sources in {dest}: {len(manifest['files'])} files, {total / 1e6:.1f} MB")
    for pkg, rec in manifest["packages"].items():
        log(f"  {pkg}@{rec['version']}: {rec.get('summary', '')}")
    log(
        f"  fonts: {len(manifest['fonts'])} files ({', '.join(sorted({f['family'] for f in manifest['fonts']}))})"
    )
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npm_pack(pkg: str, version: str, work: Path, log) -> Path:
    path = work / f"{pkg}-{version}.tgz"
    if path.is_file():
        return path
    if shutil.which("npm") is None:
        raise FileNotFoundError("npm is not installed: fetch needs it to download the emoji packages")
    log(f"  npm pack {pkg}@{version} ...")
    # npm verifies the tarball against the registry's integrity hash itself.
    subprocess.run(["npm", "pack", f"{pkg}@{version}", "--silent"], cwd=work, check=True, capture_output=True)
    if not path.is_file():
        raise FileNotFoundError(f"npm pack did not produce {path}")
    return path


def _read_members(tgz: Path, wanted) -> dict[str, bytes]:
    """Members of an npm tarball whose path (without the leading 'package/') satisfies ``wanted``."""
    out = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            name = m.name.split("/", 1)[1] if "/" in m.name else m.name
            if m.isfile() and wanted(name):
                out[name] = tar.extractfile(m).read()
    return out


def _package_record(tgz: Path, license: str, summary: str) -> dict:
    return {
        "version": tgz.stem.rsplit("-", 1)[1],
        "tarball": tgz.name,
        "tarball_sha256": _sha256(tgz),
        "license": license,
        "summary": summary,
    }


def _readme_license_section(readme: str) -> str:
    """The README paragraph listing the per-vendor image licenses (kept as the licensing evidence)."""
    lines = readme.splitlines()
    hits = [i for i, line in enumerate(lines) if "licensed" in line.lower() or "license" in line.lower()]
    if not hits:
        return ""
    return "\n".join(lines[max(0, hits[0] - 2) : hits[-1] + 3]) + "\n"


def _extract_emoji_json(tgz: Path, dest: Path) -> dict:
    files = _read_members(tgz, lambda n: n in ("emoji.json", "LICENSE", "README.md"))
    records = json.loads(files["emoji.json"])
    trimmed = []
    for r in records:
        t = {k: r[k] for k in _EMOJI_FIELDS if k in r}
        for vendor in VENDORS:
            t[f"has_img_{vendor}"] = r.get(f"has_img_{vendor}", False)
        if r.get("skin_variations"):
            t["skin_variations"] = {
                key: {
                    "unified": v["unified"],
                    "image": v["image"],
                    **{f"has_img_{vendor}": v.get(f"has_img_{vendor}", False) for vendor in VENDORS},
                }
                for key, v in r["skin_variations"].items()
            }
        trimmed.append(t)
    (dest / "emoji").mkdir(parents=True, exist_ok=True)
    (dest / "emoji" / "emoji.json").write_text(json.dumps(trimmed, separators=(",", ":")))
    (dest / "licenses").mkdir(parents=True, exist_ok=True)
    (dest / "licenses" / "emoji-datasource.LICENSE").write_bytes(files["LICENSE"])
    readme = _readme_license_section(files["README.md"].decode())
    (dest / "licenses" / "emoji-datasource.README-license.md").write_text(readme)
    n_var = sum(len(r.get("skin_variations", {})) for r in trimmed)
    return _package_record(tgz, "MIT", f"emoji.json: {len(trimmed)} emoji, {n_var} skin-tone variants")


def _extract_labels(tgz: Path, dest: Path) -> dict:
    files = _read_members(tgz, lambda n: n in ("en/data.json", "LICENSE"))
    labels = {}
    for r in json.loads(files["en/data.json"]):
        labels[r["hexcode"]] = {"label": r["label"], "tags": r.get("tags", [])}
        for s in r.get("skins", []):
            labels[s["hexcode"]] = {"label": s["label"], "tags": s.get("tags", [])}
    (dest / "emoji").mkdir(parents=True, exist_ok=True)
    (dest / "emoji" / "labels.json").write_text(json.dumps(labels, separators=(",", ":")))
    (dest / "licenses").mkdir(parents=True, exist_ok=True)
    (dest / "licenses" / "emojibase-data.LICENSE").write_bytes(files["LICENSE"])
    # The labels and keywords are Unicode CLDR annotations (Unicode License v3) packaged under MIT.
    return _package_record(tgz, "MIT (data: Unicode-3.0 CLDR annotations)", f"{len(labels)} CLDR labels")


def _extract_vendor_pack(tgz: Path, vendor: str, dest: Path, log) -> dict:
    prefix = f"img/{vendor}/64/"
    log(f"  packing {vendor} 64 px images (about 15 s) ...")
    files = _read_members(tgz, lambda n: (n.startswith(prefix) and n.endswith(".png")) or n == "LICENSE")
    images = {
        n[len(prefix) :]: np.asarray(Image.open(io.BytesIO(b)).convert("RGBA"))
        for n, b in files.items()
        if n.startswith(prefix)
    }
    pkg = VENDORS[vendor]["package"]
    write_emoji_pack(dest, vendor, images, source=f"{pkg}@{NPM_PACKAGES[pkg]}:{prefix}")
    (dest / "licenses").mkdir(parents=True, exist_ok=True)
    (dest / "licenses" / f"{pkg}.LICENSE").write_bytes(files["LICENSE"])  # MIT, for the package's code
    return _package_record(tgz, VENDORS[vendor]["license"] + " (images)", f"{len(images)} images 64x64 RGBA")


def _copy_fonts(dest: Path, work: Path, log) -> list[dict]:
    font_dir = dest / "fonts"
    font_dir.mkdir(parents=True, exist_ok=True)
    (dest / "licenses").mkdir(parents=True, exist_ok=True)
    records, extracted = [], {}
    for spec in FONTS:
        system = Path("/usr/share/fonts") / spec.dir / spec.file
        root = Path("/")
        if not system.is_file():
            if spec.package not in extracted:
                extracted[spec.package] = _apt_download(spec.package, work, log)
            root = extracted[spec.package]
            if root is None:
                log(
                    f"  font {spec.file}: not installed and `apt-get download {spec.package}` failed; skipped"
                )
                continue
        src = root / "usr/share/fonts" / spec.dir / spec.file
        if not src.is_file():
            log(f"  font {spec.file}: not found in {spec.package}; skipped")
            continue
        shutil.copyfile(src, font_dir / spec.file)
        copyright_file = root / "usr/share/doc" / spec.package / "copyright"
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, dest / "licenses" / f"{spec.package}.copyright")
        records.append(
            {
                "file": spec.file,
                "family": spec.family,
                "style": spec.style,
                "weight": spec.weight,
                "license": spec.license,
                "debian_package": spec.package,
                "version": _deb_version(spec.package, root),
            }
        )
    (font_dir / "fonts.json").write_text(json.dumps(records, indent=1))
    return records


def _apt_download(package: str, work: Path, log) -> Path | None:
    """Unpack a Debian package without installing it (needs no root, only the apt lists)."""
    log(f"  apt-get download {package} ...")
    r = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        return None
    root = work / f"deb-{package}"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
    (root / "version").write_text(debs[-1].name.split("_")[1].replace("%3a", ":"))
    return root


def _deb_version(package: str, root: Path) -> str:
    if (root / "version").is_file():
        return (root / "version").read_text()
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"
