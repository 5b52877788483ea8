"""The demo world's preference pool: what a team's feedback log would hold, with a known ground truth.

Each prompt gets samples of the base model (as Pick-a-Pic pairs are samples of Stable Diffusion models)
and renderings with one corrupted attribute plus artifacts (other, worse "models"). Simulated
annotators judge random pairs of them with Bradley-Terry noise around the oracle, rank each prompt's
images (Plackett-Luce, the listwise form of the same noise) and give binary feedback.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefalign.config import PipelineConfig

log = logging.getLogger(__name__)
EPOCH = pd.Timestamp("2026-01-01T00:00:00Z")


def _pool_images(cfg: PipelineConfig, prompts: pd.DataFrame) -> tuple[list[str], np.ndarray, list[str]]:
    """(prompt of each image, uint8 images, model name of each image) for the whole pool."""
    from prefalign.models.diffusion import load_base_pipeline
    from prefalign.models.sampling import generate
    from prefalign.seeding import derive_seed, numpy_rng
    from prefalign.world.grammar import corrupt, parse_prompt
    from prefalign.world.render import render

    owners, models, chunks = [], [], []
    n_base = cfg.data.pool_base_samples
    if n_base:
        flat = [p for p in prompts.prompt for _ in range(n_base)]
        seeds = [derive_seed(cfg.seed, "pool", p, i) % 2**63 for p in prompts.prompt for i in range(n_base)]
        pipe = load_base_pipeline(cfg.base_model_dir())
        chunks.append(
            generate(
                pipe,
                flat,
                seeds,
                steps=cfg.data.pool_sample_steps,
                guidance=cfg.data.pool_guidance,
                resolution=cfg.model.resolution,
                desc="pool: base samples",
            )
        )
        owners += flat
        models += ["base"] * len(flat)
    rng = numpy_rng(cfg.seed, "pool-renderings")
    renders = []
    for prompt in prompts.prompt:
        for _ in range(cfg.data.pool_renderings):
            wrong = corrupt(parse_prompt(prompt), rng)
            blur = bool(rng.random() < 0.5)
            renders.append(render(wrong, cfg.world.image_size, noise_sigma=rng.uniform(0, 30), blur=blur, rng=rng))
            owners.append(prompt)
            models.append("renderer")
    if renders:
        chunks.append(np.stack(renders))
    return owners, np.concatenate(chunks), models


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _judge(cfg: PipelineConfig, images: pd.DataFrame, split_of: dict[str, str]) -> tuple[list, list, list]:
    """Pairs, rankings and binary feedback from simulated annotators."""
    from prefalign.data.prepare import pair_id
    from prefalign.data.pseudonym import pseudonymise
    from prefalign.seeding import numpy_rng
    from prefalign.world.annotators import annotate

    rng = numpy_rng(cfg.seed, "annotators")
    tau = cfg.world.annotator_tau
    annotators = [pseudonymise(f"demo-annotator-{k}") for k in range(cfg.world.n_annotators)]
    # Binary feedback asks "is this image acceptable?": the bar is the pool's median quality.
    bar = float(images.oracle.median())
    pairs: list[dict] = []
    rankings: list[dict] = []
    feedback: list[dict] = []
    for prompt, group in images.groupby("prompt", sort=False):
        rows = group.to_dict("records")
        combos = list(itertools.combinations(range(len(rows)), 2))
        for k in rng.permutation(len(combos))[: cfg.data.pool_pairs_per_prompt]:
            a, b = (rows[i] for i in combos[k])
            a_wins = bool(annotate(np.array([a["oracle"]]), np.array([b["oracle"]]), tau=tau, rng=rng)[0])
            w, lo = (a, b) if a_wins else (b, a)
            pairs.append(
                {
                    "pair_id": pair_id(prompt, w["sha"], lo["sha"], tie=False),
                    "prompt": prompt,
                    "image_w": w["sha"],
                    "image_l": lo["sha"],
                    "label": 1.0,
                    "source": "demo",
                    "split": split_of[prompt],
                    "model_w": w["model"],
                    "model_l": lo["model"],
                    "annotator": annotators[int(rng.integers(len(annotators)))],
                    "created_at": EPOCH + pd.Timedelta(seconds=len(pairs)),
                }
            )
        # Plackett-Luce draw = sort by utility/tau + Gumbel noise: the listwise form of the same annotators.
        order = np.argsort(-(np.array([r["oracle"] for r in rows]) / tau + rng.gumbel(size=len(rows))))
        ranked = [rows[i]["sha"] for i in order]
        rankings.append(
            {
                "ranking_id": _sha(prompt, *ranked),
                "prompt": prompt,
                "images": ranked,
                "source": "demo",
                "split": split_of[prompt],
            }
        )
        for r in rows:
            desirable = bool(annotate(np.array([r["oracle"]]), np.array([bar]), tau=tau, rng=rng)[0])
            feedback.append(
                {
                    "feedback_id": _sha(prompt, r["sha"]),
                    "prompt": prompt,
                    "image": r["sha"],
                    "desirable": desirable,
                    "source": "demo",
                    "split": split_of[prompt],
                }
            )
    return pairs, rankings, feedback


def build_demo_pool(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Write the canonical tables and image store of the demo pool into ``out``."""
    from prefalign.data import schema
    from prefalign.world.annotators import bayes_accuracy
    from prefalign.world.oracle import oracle_scores

    prompts = pd.read_parquet(cfg.paths.resolve("world") / "prompts.parquet")
    if cfg.data.pool_prompts < len(prompts):
        prompts = prompts.sample(n=cfg.data.pool_prompts, random_state=cfg.seed % 2**32).reset_index(drop=True)
    owners, images, models = _pool_images(cfg, prompts)
    store = schema.ImageStore(out)
    shas = [store.put_array(img) for img in images]
    table = pd.DataFrame({"prompt": owners, "sha": shas, "model": models, "oracle": oracle_scores(owners, images)})
    table = table.drop_duplicates(["prompt", "sha"])
    pairs, rankings, feedback = _judge(cfg, table, dict(zip(prompts.prompt, prompts.split, strict=True)))
    pairs_df = pd.DataFrame(pairs)
    schema.write_table(pairs_df, out / "pairs.parquet", schema.PAIRS_SCHEMA)
    schema.write_table(pd.DataFrame(rankings), out / "rankings.parquet", schema.RANKINGS_SCHEMA)
    schema.write_table(pd.DataFrame(feedback), out / "feedback.parquet", schema.FEEDBACK_SCHEMA)
    schema.write_table(
        schema.empty_table(schema.QUARANTINE_SCHEMA), out / "quarantine.parquet", schema.QUARANTINE_SCHEMA
    )
    oracle_of = dict(zip(table.sha, table.oracle, strict=False))
    bayes = bayes_accuracy(
        pairs_df.image_w.map(oracle_of).to_numpy(),
        pairs_df.image_l.map(oracle_of).to_numpy(),
        tau=cfg.world.annotator_tau,
    )
    by_model = table.groupby("model").oracle.mean().to_dict()
    log.info(
        "demo pool: %d images, %d pairs, Bayes accuracy %.3f, mean oracle %s", len(table), len(pairs), bayes, by_model
    )
    return {
        "images": len(table),
        "pairs": len(pairs),
        "rankings": len(rankings),
        "feedback": len(feedback),
        "bayes_accuracy": float(bayes),
        **{f"oracle_mean_{m}": float(v) for m, v in by_model.items()},
    }
