"""Copy installed Python distributions into a virtual environment tree for a stand-in image.

    python docker/standin/copy_packages.py DEST REQUIREMENT... [--without REQUIREMENT...]

Puts every file (by its RECORD) of the installed distributions that satisfy the requirements,
and of their dependencies, from the environment of the interpreter that runs this script into
DEST (a venv root: DEST/lib/pythonX.Y/site-packages and DEST/bin), as hard links where it can
(the files are only read from there), leaving out those that the `--without` requirements
bring (a lower image layer has them). Console scripts get `#!/python/venv/bin/python`, where
Flower's images keep their environment.

CPU only: the CUDA runtime distributions (nvidia-*, cuda-*, triton; about 4 GB) are left out.
The libraries of theirs that torch links against are replaced by stubs: shared libraries with
the same names and symbols, whose functions return cudaErrorNoDevice (100); torch then finds
no GPU and runs on the CPU, as a CPU build would. Two torch libraries that it loads only for
GPU work are left out too. torch's metadata stops requiring the left-out distributions, so
pip sees a complete environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

VENV = "/python/venv"
CUDA_DISTS = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# torch's CUDA libraries that it loads only when it uses a GPU
TORCH_CUDA_LIBS = {"libtorch_cuda_linalg.so", "libcaffe2_nvrtc.so"}
NO_DEVICE = 100  # cudaErrorNoDevice


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions that the requirements need, by canonical name."""
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if CUDA_DISTS.match(name) or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        dist = found.get(name) or md.distribution(req.name)
        if dist.version not in req.specifier:
            sys.exit(f"{req} wanted, {dist.version} installed")
        found[name] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": extra}) for extra in req.extras or {""}
            ):
                todo.append(dep)
    return found


def copy_distribution(dist: md.Distribution, site: Path, bin_dir: Path) -> list[Path]:
    """Copy one distribution's files; returns the ELF files copied."""
    elves = []
    for entry in dist.files or []:
        source = Path(dist.locate_file(entry))
        relative = Path(entry)
        if relative.parts[0] == ".." and "bin" in relative.parts:
            target = bin_dir / relative.name
        elif relative.parts[0] == "..":
            continue  # data files outside the environment's bin: none needed here
        else:
            target = site / relative
        if source.name in TORCH_CUDA_LIBS or not source.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent == bin_dir:
            _copy_script(source, target)
            continue
        if target.name == "METADATA" and canonicalize_name(dist.name) == "torch":
            target.write_text(_without_cuda_requirements(source.read_text()))
            continue
        _link(source, target)
        if source.suffix == ".so" or ".so." in source.name:
            elves.append(target)
    return elves


def _link(source: Path, target: Path) -> None:
    """A hard link where it can be (fast; the files are only read), else a copy."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)


def _copy_script(source: Path, target: Path) -> None:
    lines = source.read_bytes().split(b"\n")
    if lines[0] == b"#!/bin/sh" and lines[1].startswith(b"'''exec'"):
        lines = [b"#!python", *lines[3:]]  # pip's header for a long interpreter path
    if lines[0].startswith(b"#!") and b"python" in lines[0]:
        lines[0] = f"#!{VENV}/bin/python".encode()
    target.write_bytes(b"\n".join(lines))
    target.chmod(0o755)


def _without_cuda_requirements(metadata: str) -> str:
    return "".join(
        line
        for line in metadata.splitlines(keepends=True)
        if not (
            line.startswith("Requires-Dist:")
            and CUDA_DISTS.match(canonicalize_name(Requirement(line.split(":", 1)[1]).name))
        )
    )


# ------------------------------------------------------------------------ stubs
def _needed(elf: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _symbols(elf: Path, undefined: bool) -> set[tuple[str, str]]:
    """(name, version) of the dynamic symbols defined in / needed by `elf`."""
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(
        ["nm", "-D", flag, "--with-symbol-versions", str(elf)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    symbols = set()
    for line in out.splitlines():
        name, _, version = line.split()[-1].partition("@")
        symbols.add((name, version.lstrip("@")))
    return symbols


def cuda_libraries() -> dict[str, Path]:
    """soname -> library of the CUDA runtime distributions (left out)."""
    return {
        lib.name: lib
        for site in sys.path
        if site.endswith("site-packages")
        for lib in Path(site).glob("nvidia/**/lib/*.so*")
    }


def write_stubs(elves: list[Path], stub_dir: Path) -> list[str]:
    """Stub every left-out library that a copied ELF file needs; returns their names."""
    sources = cuda_libraries()
    needs = {elf: set(_needed(elf)) & sources.keys() for elf in elves}
    wanted = set().union(*(_symbols(elf, undefined=True) for elf in elves if needs[elf]))
    missing = sorted(set().union(*needs.values()))
    for soname in missing:
        symbols = {
            (name, version)
            for name, version in _symbols(sources[soname], undefined=False)
            if ((name, version) in wanted or (name, "") in wanted)
            # unversioned C++ symbols are the C++ runtime it carries: the system's serves
            and not (name.startswith("_Z") and not version)
        }
        _compile_stub(soname, sorted(symbols), stub_dir / soname)
    return missing


def _compile_stub(soname: str, symbols: list[tuple[str, str]], target: Path) -> None:
    """Every symbol a function returning cudaErrorNoDevice (error strings: a message)."""
    code = ['static const char message[] = "CUDA is not available in this stand-in image";']
    versions: dict[str, list[str]] = {}
    for i, (name, version) in enumerate(symbols):
        versions.setdefault(version, []).append(name)
        error_text = "ErrorString" in name or "ErrorName" in name
        body = "message" if error_text else f"(void *) {NO_DEVICE}"
        code.append(f'const void *f{i}(void) __asm__("{name}");')
        code.append(f"const void *f{i}(void) {{ return {body}; }}")
    script = [
        f"{version} {{ global: {' '.join(f'{name};' for name in names)} }};"
        for version, names in versions.items()
        if version
    ]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "stub.c").write_text("\n".join(code) + "\n")
        cmd = ["gcc", "-shared", "-fPIC", "-w", "-o", str(target), f"{tmp}/stub.c",
               f"-Wl,-soname,{soname}"]  # fmt: skip
        if script:
            (Path(tmp) / "stub.map").write_text("\n".join(script) + "\n")
            cmd.append(f"-Wl,--version-script={tmp}/stub.map")
        subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="venv root to fill (created)")
    parser.add_argument("requirements", nargs="+")
    parser.add_argument("--without", nargs="*", default=[], help="already in a lower layer")
    args = parser.parse_args()
    base = closure(args.without)
    dists = {n: d for n, d in closure(args.requirements).items() if n not in base}
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site, bin_dir = args.dest / "lib" / py / "site-packages", args.dest / "bin"
    site.mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    elves = []
    for dist in dists.values():
        elves += copy_distribution(dist, site, bin_dir)
    stubs = write_stubs(elves, site / "torch" / "lib") if "torch" in dists else []
    print(f"{len(dists)} distributions into {args.dest}; CUDA stubs: {', '.join(stubs) or '-'}")


if __name__ == "__main__":
    main()
