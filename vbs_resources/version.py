"""vbs's installed version (``vbs --version``, Sentry's release)."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("vbs")
    except PackageNotFoundError:
        return "unknown"
