"""Packages that model definitions import by another name: this folder goes first on ``sys.path`` when the
harness loads a model definition (harness/definition.py, `use_compat_packages`), so that ``import
determined`` finds the harness's own `determined` package (Determined's trial API mapped onto the harness)
ahead of any installed Determined. Nothing imports it as ``harness.compat``."""
