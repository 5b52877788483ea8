"""The registered diffusion policy as an MLflow pyfunc, logged with MLflow's "models from code".

``prefalign.registry`` logs this *file* (not a pickled object) as the model's code, with two artifacts:
``base`` (the base ``StableDiffusionPipeline`` folder) and ``policy`` (a diffusers LoRA file or a full
``unet/`` folder). MLflow runs the file when it loads the model, in any process where ``prefalign`` is
installed, so a registered version loads with no pickle tied to the Python that logged it::

    pipe = mlflow.pyfunc.load_model("models:/prefalign-policy@champion")
    pngs = pipe.predict(["a small red circle at the center on a black background"], params={"seed": 1})

Only MLflow and ``registry.register_policy`` import this module (importing it imports mlflow); mlflow is
still imported inside functions, so ``src`` keeps one rule: no module-level mlflow import anywhere.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Defaults of the predict params; registry.py declares the same values in the model signature so that
# MLflow passes params through (it drops params a signature does not declare).
DEFAULT_PARAMS: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 3.0, "seed": 0}


def _python_model_base() -> type:
    """``mlflow.pyfunc.PythonModel``, imported here so the module has no top-level mlflow import."""
    from mlflow.pyfunc import PythonModel

    return PythonModel


def _as_prompts(model_input: Any) -> list[str]:
    """Prompts from what pyfunc hands over: a list, a string, a pandas frame/series or an array.

    MLflow's schema enforcement may turn a plain list into a one-column DataFrame, so every shape the
    signature ``[string]`` admits is accepted here.
    """
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0]
    prompts = [str(p) for p in list(model_input)]
    if not prompts:
        raise ValueError("predict needs at least one prompt")
    return prompts


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DiffusionPolicyModel(_python_model_base()):  # type: ignore[misc]
    """Prompts in, base64-encoded PNGs out, from the base pipeline with the policy applied."""

    def load_context(self, context: Any) -> None:
        """Load ``base`` + ``policy`` through the same loader evaluation uses (no second code path)."""
        import torch

        from prefalign.models.diffusion import load_policy_pipeline

        policy = context.artifacts.get("policy")
        self.pipe = load_policy_pipeline(Path(context.artifacts["base"]), Path(policy) if policy else None)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    # model_input is deliberately unannotated: MLflow infers a signature from a predict type hint and
    # then replaces the logged one, dropping its params schema (and with them the params at predict time).
    # The price is MLflow's harmless "Add type hints to the `predict` method" warning at log and load.
    def predict(self, model_input, params: Mapping[str, Any] | None = None) -> list[str]:
        """Generate one image per prompt.

        Args:
            model_input: prompts (``list[str]``; a one-column frame or a single string also works).
            params: ``num_inference_steps`` (20), ``guidance_scale`` (3.0), ``seed`` (0); prompt ``i``
                uses the generator seed ``seed + i``, so one prompt's image does not depend on its batch.

        Returns:
            One base64-encoded PNG per prompt, in order.
        """
        import torch

        merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = _as_prompts(model_input)
        generators = [torch.Generator(self.device).manual_seed(int(merged["seed"]) + i) for i in range(len(prompts))]
        with torch.inference_mode():
            images = self.pipe(
                prompts,
                num_inference_steps=int(merged["num_inference_steps"]),
                guidance_scale=float(merged["guidance_scale"]),
                generator=generators,
                output_type="pil",
            ).images
        return [_png_base64(image) for image in images]


def _declare_model() -> None:
    """Tell MLflow which object this code file defines (called when MLflow runs the file)."""
    from mlflow.models import set_model

    set_model(DiffusionPolicyModel())


_declare_model()
