"""The house rules a newcomer relies on (issue 9): the README's layout names every module and package of
rrt_ray/, and no job reaches past the installed package with sys.path edits."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]  # the fenced tree right under the heading


def test_readme_layout_names_every_module_and_package():
    block = _layout_block()
    named = set(re.findall(r"rrt_ray/(\w+)", block)) | set(re.findall(r"\b(\w+)\.py\b", block))
    package = REPO / "rrt_ray"
    present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert present - named == set(), f"README layout misses {sorted(present - named)}"


def test_jobs_import_the_installed_package():
    # `make install` installs rrt_ray (editable); a sys.path edit would hide a broken install.
    offenders = [p.name for p in sorted((REPO / "jobs").glob("*.py")) if "sys.path.insert" in p.read_text()]
    assert offenders == [], f"jobs that edit sys.path: {offenders}"
