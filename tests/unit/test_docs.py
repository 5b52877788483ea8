"""The README is a front door, and every document the repository points at exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines; measured results go to docs/results.md"
    assert lines[2:6] and "make run" in "\n".join(lines[:8]) and "make test" in "\n".join(lines[:8])


def test_relative_links_resolve():
    broken = []
    for doc in _tracked("*.md"):
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_every_mentioned_document_exists():
    """A markdown file named in code, config or docs is a file of this repository."""
    names = {p.name for p in _tracked("*.md")}
    paths = {str(p.relative_to(ROOT)) for p in _tracked("*.md")}
    missing = []
    for path in _tracked("*.py", "*.md", "*.toml", "*.yaml", "*.yml", "Makefile"):
        for mention in MD_NAME.findall(path.read_text()):
            if mention not in paths and mention.split("/")[-1] not in names:
                missing.append(f"{path.relative_to(ROOT)}: {mention}")
    assert not missing, "\n".join(missing)
