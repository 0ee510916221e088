"""``python -m harness.compat``: write ``harness-compat.pth`` into this interpreter's site-packages, so that
``import determined`` in a script run with ``python train.py`` (a Determined Trainer script) finds the
harness's package. An installed Determined still wins there (site-packages comes first); under the
``harness`` command the harness's package always does (harness/definition.py). scripts/setup.sh and the
Dockerfile run it."""

import os
import sysconfig

COMPAT_DIR = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    site = sysconfig.get_paths()["purelib"]
    path = os.path.join(site, "harness-compat.pth")
    with open(path, "w", encoding="utf-8") as f:
        f.write(COMPAT_DIR + "\n")
    print(f"harness: {path} puts {COMPAT_DIR} on sys.path (import determined)")


if __name__ == "__main__":
    main()
