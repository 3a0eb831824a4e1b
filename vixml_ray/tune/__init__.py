"""Ray Tune sweeps over training choices (prompt template, image position, number of images, LoRA, learning rates,
margin, cluster curriculum) with ASHA, each trial a Ray Train run.

Public API::

    run_sweep(cfg) -> dict                          # vixml_ray.tune.sweep: the sweep job (new or resumed) + report
    search_space(cfg) -> SearchSpace                # vixml_ray.tune.space: tune.presets + tune.space, validated
    apply_choices(cfg, choices) -> Config           # vixml_ray.tune.space: a trial's config
    trial_concurrency(cfg, resources) -> int        # vixml_ray.tune.sweep: trials that fit at once
    PRESETS                                         # vixml_ray.tune.presets: the named spaces
"""

from __future__ import annotations

from vixml_ray.tune.presets import PRESETS
from vixml_ray.tune.space import SearchSpace, apply_choices, search_space

__all__ = ["PRESETS", "SearchSpace", "apply_choices", "run_sweep", "search_space", "trial_concurrency"]


def __getattr__(name: str):  # the driver pulls in Ray, torch and transformers: import it on first use
    if name in ("run_sweep", "trial_concurrency"):
        from vixml_ray.tune import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'vixml_ray.tune' has no attribute '{name}'")
