"""The demo world: prompt grammar (``grammar``), renderer (``render``), pixel oracle (``oracle``), strict
per-attribute reading (``attributes``) and simulated annotators (``annotators``), with known ground truth.

Nothing is re-exported: importing one module of the world runs that module only, so a stage's import closure
(what ``tests/unit/test_dvc_deps.py`` checks against ``dvc.yaml``) holds what the stage really uses.
"""
