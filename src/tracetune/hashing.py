"""sha256 of files, and comparing a directory against a listing of expected hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_mismatches(root: Path, expected: dict[str, str]) -> list[tuple[str, str]]:
    """(relative name, "missing" | "altered") for every listed file that is absent or whose sha256 differs."""
    problems = []
    for name, digest in expected.items():
        file = root / name
        if not file.is_file():
            problems.append((name, "missing"))
        elif sha256_file(file) != digest:
            problems.append((name, "altered"))
    return problems
