"""The package list: everything under src/, plus templates/ (at the repository root) as package data.

All other metadata is in pyproject.toml; this file exists only because a pyproject table cannot add a
folder outside src/ to the packages that setuptools finds. Folders count as packages with or without
an ``__init__.py`` (migrations, templates), so none is dropped from the wheel by accident.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

TEMPLATES = Path(__file__).parent / "templates"
template_packages = ["unitedllm_build.templates"] + [
    "unitedllm_build.templates." + ".".join(folder.relative_to(TEMPLATES).parts)
    for folder in sorted(TEMPLATES.rglob("*"))
    if folder.is_dir() and "__pycache__" not in folder.parts
]

setup(
    packages=[
        *find_namespace_packages("src", include=["unitedllm*"], exclude=["*__pycache__*"]),
        *template_packages,
    ],
    package_dir={"": "src", "unitedllm_build.templates": "templates"},
    package_data={name: ["*", ".*"] for name in template_packages},
)
