"""Where rrt-ray keeps what it can rebuild, by one rule.

Caches (tokenised corpora, downloaded sources, converted models, compiled DeepSpeed ops, worker scratch)
live under `CACHE_ROOT`, the user's cache directory, so that an installed package, a `ray job submit`
working directory and a plain checkout all find them again; each is keyed by content, so sharing them
between runs is safe. What a run produces (`run.storage`, `run.output`, `rrt convert ... OUT`) goes where
the user says: a relative path there is relative to the current directory, as for any command-line path.
A leading "~" is expanded where the path is used (on each Ray worker, that worker's home).
"""

from __future__ import annotations

CACHE_ROOT = "~/.cache/rrt_ray"


def cache_dir(name: str) -> str:
    """The cache folder for one kind of content, e.g. cache_dir("tokens") -> "~/.cache/rrt_ray/tokens"."""
    return f"{CACHE_ROOT}/{name}"
