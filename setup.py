"""Packages are found, never listed by hand, and install under one name: `fleettune`.

The repository keeps the design card's top-level folders (`shared/`, `workers/`); the wheel maps
them to `fleettune.shared` and `fleettune.workers`, and the SDK (`shared/sdk`) to `fleettune`
itself, so a user's site-packages gains only `fleettune` and the SDK is one module object.
"""

from setuptools import find_packages, setup

SDK = "shared.sdk"


def _packages() -> dict[str, str]:
    found = {"fleettune": "shared/sdk"}
    for package in find_packages(include=["shared", "shared.*", "workers", "workers.*"]):
        if package != SDK and not package.startswith(SDK + "."):
            found[f"fleettune.{package}"] = package.replace(".", "/")
    return found


PACKAGES = _packages()
setup(packages=list(PACKAGES), package_dir=PACKAGES)
