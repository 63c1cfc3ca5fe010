"""Make the folder of wheels benchmarks/gpu_acceptance.py needs on a GPU lease, small enough to carry.

A lease's machine has python3 with torch, transformers, peft and accelerate, nothing else of ours,
and no network. This downloads (here, from the package registry) what the script imports beyond
those, with --no-deps: diffusers and what it requires that such a python3 may lack (requests and its
own requirements, importlib_metadata, Pillow), optimum-quanto, bitsandbytes and platformdirs. The
bitsandbytes wheel holds a kernel library for every CUDA and ROCm release (43 MB compressed); only
the CUDA builds from --min-cuda on are kept, which a current torch uses, so the folder stays far
under a lease's 64 MiB carry. The wheels are only ever unpacked (python3 -m zipfile -e), never
installed, so the trimmed wheel's RECORD is not checked.

    python benchmarks/gpu_wheels.py [--out .gpu_wheels] [--python-version 3.11] [--min-cuda 126]

Pillow and charset-normalizer are built per CPython version: give the lease's (python3 --version
there); where the lease's python3 already imports PIL, --no-pillow leaves it out.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PURE = ["diffusers", "optimum-quanto", "platformdirs", "requests", "urllib3", "certifi", "importlib_metadata", "zipp"]
# Built per CPython version: downloaded for the lease's.
PER_PYTHON = ["charset-normalizer"]
KERNEL = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)(\d+)\.so$")


def download(names: list[str], out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), *extra, *names], check=True)


def trim_bitsandbytes(wheel: Path, min_cuda: int) -> None:
    """Rewrite the wheel without the kernel libraries a CUDA build of torch from min_cuda on never loads."""
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            kernel = KERNEL.search(info.filename)
            if kernel and (kernel.group(1) != "cuda" or int(kernel.group(2)) < min_cuda):
                continue
            target.writestr(info, source.read(info))
    trimmed.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu_wheels"))
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the lease's python3 version, for Pillow's wheel")
    parser.add_argument("--min-cuda", type=int, default=126, help="oldest CUDA build of bitsandbytes kept (126 = 12.6)")
    parser.add_argument("--no-pillow", action="store_true", help="the lease's python3 imports PIL already")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    download(PURE, args.out)
    download(["bitsandbytes"], args.out)
    lease_python = ("--only-binary=:all:", "--python-version", args.python_version, "--platform", "manylinux_2_28_x86_64")
    download(PER_PYTHON + ([] if args.no_pillow else ["pillow"]), args.out, *lease_python)
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel, args.min_cuda)
    total = 0
    for wheel in sorted(args.out.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size:>12,}  {wheel.name}")
    print(f"{total:>12,}  total ({total / 2**20:.1f} MiB) in {args.out}")


if __name__ == "__main__":
    main()
