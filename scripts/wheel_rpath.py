"""Make a freshly built wheel's shared libraries find their dependencies where they will be at run time.

The linker records the build's folders as RUNPATH: the CUDA toolkit from PyPI (a cache folder that an
image's runtime stage does not have), a temporary folder for NCCL's link name, the virtualenv's absolute
path. Each NEEDED library that the virtualenv's site-packages holds (torch's libraries, NCCL, the CUDA
runtime) is found instead relative to the library itself ($ORIGIN), so that the wheel loads the copy torch
loads, wherever the virtualenv lies; build-only folders are dropped, system folders (Open MPI) kept.
Rewrites the wheel in place, RECORD included.
    usage: python wheel_rpath.py WHEEL PATCHELF SITE_PACKAGES BUILD_DIR...
"""

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile


def _patchelf(patchelf: str, *args: str) -> str:
    return subprocess.run([patchelf, *args], check=True, capture_output=True, text=True).stdout.strip()


def _libraries(site: str) -> dict[str, str]:
    """Shared library file name -> its folder, for every library under site-packages."""
    found: dict[str, str] = {}
    for folder, _, files in os.walk(site):
        for name in files:
            if ".so" in name:
                found.setdefault(name, folder)
    return found


def new_runpath(
    so_path: str, member: str, patchelf: str, site: str, libraries: dict[str, str], build_dirs: list[str]
) -> str:
    """The RUNPATH for one library of the wheel (member: its path inside the wheel = inside site)."""
    here = os.path.dirname(os.path.join(site, member))
    entries: list[str] = []
    for needed in _patchelf(patchelf, "--print-needed", so_path).split():
        if needed in libraries:
            entry = "$ORIGIN/" + os.path.relpath(libraries[needed], here)
            if entry not in entries:
                entries.append(entry)
    for old in _patchelf(patchelf, "--print-rpath", so_path).split(":"):
        build_only = any(old == d or old.startswith(d.rstrip("/") + "/") for d in [site, *build_dirs])
        if old and not build_only and old not in entries:
            entries.append(old)
    return ":".join(entries)


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def main(wheel: str, patchelf: str, site: str, *build_dirs: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
        members = {info.filename: zf.read(info) for info in infos}
    libraries = _libraries(site)
    record = next(name for name in members if name.endswith(".dist-info/RECORD"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in members if n.endswith(".so") or ".so." in n]:
            path = os.path.join(tmp, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(members[name])
            runpath = new_runpath(path, name, patchelf, site, libraries, list(build_dirs))
            _patchelf(patchelf, "--set-rpath", runpath, path)
            with open(path, "rb") as f:
                members[name] = f.read()
            print(f"[horovod] {name}: RUNPATH {runpath}")
    rows = [_record_line(name, data) for name, data in members.items() if name != record]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([*rows, [record, "", ""]])
    members[record] = out.getvalue().encode()
    with zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as zf:
        for info in infos:  # the same entries, names and modes; new contents
            zf.writestr(info, members[info.filename], zipfile.ZIP_DEFLATED)
    os.replace(wheel + ".tmp", wheel)


if __name__ == "__main__":
    main(*sys.argv[1:])
