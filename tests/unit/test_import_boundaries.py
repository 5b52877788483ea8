"""The core imports no orchestration, tracking, validation or DVC code until a function needs it."""

import json
import subprocess
import sys

CORE_MODULES = ["prefalign", "prefalign.config", "prefalign.tracking", "prefalign.registry", "prefalign.versioning"]
HEAVY = ["prefect", "mlflow", "great_expectations", "dvc"]


def test_core_import_leaves_heavy_tools_unloaded():
    # A fresh interpreter: this pytest process has long imported everything.
    code = (
        "import importlib, json, sys\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
