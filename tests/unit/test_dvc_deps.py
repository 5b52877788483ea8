"""dvc.yaml lists every source file whose change can change a stage's outputs.

Each stage is the module ``prefalign.stages.<stage>``, imported only when that stage runs, so the code a
stage can execute is the import closure of that module. The closure is read from the source (every
``import`` anywhere in a file counts, lazy ones included, since they run when the stage calls them;
``if TYPE_CHECKING:`` blocks do not run and do not count), with each imported module's parent packages,
whose ``__init__`` runs first. A stage's ``dvc.yaml`` deps must cover each file of it, by the file itself
or by a folder above it. ``tracking`` and ``versioning`` are in the closure and stay deps: they write the
stage's ``run.json``, which is part of its DVC output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from import_graph import ROOT, SRC, import_closure


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_deps_cover_the_stage_code(stage):
    deps = [str(d) for d in STAGES[stage].get("deps", [])]
    closure = import_closure(f"prefalign.stages.{stage}")
    assert SRC / "prefalign" / "stages" / f"{stage}.py" in closure
    missing = sorted(str(p.relative_to(ROOT)) for p in closure if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} misses deps on: {', '.join(missing)}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_source_deps_are_stage_code(stage):
    """A source dep that is missing or outside the closure reruns the stage for nothing (or never matches)."""
    closure = import_closure(f"prefalign.stages.{stage}")
    extra = [
        d
        for d in STAGES[stage].get("deps", [])
        if str(d).startswith("src/") and not any(_covered(p, [str(d)]) for p in closure)
    ]
    assert not extra, f"dvc.yaml stage {stage!r} depends on source it never runs (or that does not exist): {extra}"


def test_closure_follows_lazy_and_relative_imports(tmp_path):
    """The reader itself: a lazy import inside a function counts, a TYPE_CHECKING one does not."""
    pkg = tmp_path / "prefalign"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from prefalign import hidden\n"
        "def f():\n    from . import b\n    from prefalign.c import thing\n"
    )
    for name in ("b", "hidden"):
        (pkg / "sub" / f"{name}.py").write_text("")
    (pkg / "hidden.py").write_text("")
    (pkg / "c.py").write_text("thing = 1\n")
    names = {str(p.relative_to(tmp_path)) for p in import_closure("prefalign.sub.a", src=tmp_path)}
    assert names == {
        "prefalign/__init__.py",
        "prefalign/sub/__init__.py",
        "prefalign/sub/a.py",
        "prefalign/sub/b.py",
        "prefalign/c.py",
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_dvc_param_is_a_key_of_params_yaml(stage):
    """`dvc repro` fails on a param that params.yaml does not spell out (a schema default is not enough)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for key in STAGES[stage].get("params", []):
        node = params
        for part in str(key).split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"dvc.yaml stage {stage!r} params not in params.yaml: {missing}"
