"""The core library's layering, read from the source (``import_graph``).

The core packages never reach up into orchestration, tracking or the registry, and the package graph among
them has no cycle, so each can be read, tested and changed from the bottom up.
"""

from __future__ import annotations

import subprocess
import sys

from import_graph import SRC, imported_modules

CORE = ("config", "seeding", "losses", "data", "models", "world", "training", "evaluation")
UPPER = ("stages", "cli", "registry", "tracking", "policy_model")
PACKAGE = SRC / "prefalign"


def _core_edges() -> dict[str, set[str]]:
    """Package -> the other core packages its files import."""
    edges: dict[str, set[str]] = {name: set() for name in CORE}
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top in CORE:
            for module in imported_modules(path):
                target = module.split(".")[1] if "." in module else ""
                if target in CORE and target != top:
                    edges[top].add(target)
    return edges


def test_core_never_imports_orchestration_tracking_or_registry():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0].removesuffix(".py") in CORE:
            found += [
                f"{rel} imports {m}"
                for m in sorted(imported_modules(path))
                if m.split(".")[1:2] in [[u] for u in UPPER]
            ]
    assert not found, "\n".join(found)


def test_losses_are_the_bottom_layer():
    assert _core_edges()["losses"] == set(), "losses import no other prefalign package"


def test_core_package_graph_has_no_cycle():
    edges = _core_edges()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in CORE:
        if node not in state:
            visit(node, [])


def test_jsonl_ingest_loads_no_demo_world(tmp_path):
    """Real data must not depend on the demo: an ingest of a JSONL source imports no prefalign.world module."""
    code = f"""
import base64, io, json, shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
from prefalign.config import load_config
from prefalign.stages import run_stage
root = Path({str(tmp_path)!r})
shutil.copy({str(SRC.parent / "params.yaml")!r}, root / "params.yaml")
(root / "data" / "source").mkdir(parents=True)
rng = np.random.default_rng(0)
def png():
    buf = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
lines = [{{"type": "pair", "prompt": f"photo {{i}}", "image_w": {{"base64": png()}},
          "image_l": {{"base64": png()}}}} for i in range(12)]
(root / "data" / "source" / "feedback.jsonl").write_text("\\n".join(json.dumps(x) for x in lines) + "\\n")
cfg = load_config(root / "params.yaml", {{"data.source": "jsonl", "tracking.enabled": False}})
summary = run_stage("ingest", cfg)
assert summary["imported_pairs"] == 12, summary
print(json.dumps(sorted(m for m in sys.modules if m.startswith("prefalign.world"))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
