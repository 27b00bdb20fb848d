"""Maps the top-level convert/ and metal/ folders into the mlxkt package (see pyproject)."""

from setuptools import find_packages, setup

MAPPED = {"mlxkt.convert": "convert", "mlxkt.metal": "metal"}
packages = find_packages(include=["mlxkt", "mlxkt.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{p}" for p in find_packages(where=folder)]

setup(packages=packages, package_dir={"mlxkt": "mlxkt", **MAPPED})
