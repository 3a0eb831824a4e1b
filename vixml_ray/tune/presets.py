"""Named search spaces of the paper's ablations, as config data: ``tune.presets: [prompt, lora]`` merges them (in
order) under ``tune.space``. Each maps dotted config keys to a spec (see :class:`vixml_ray.config.TuneConfig`); the
numeric ranges are the reference scale (Qwen2.5 with LoRA), tiny models want their own ranges in ``tune.space``.
"""

from __future__ import annotations

import copy
from typing import Any

from vixml_ray.errors import ConfigError

#: The prompt ablation of ViXML (decoders): text only (E; T1+E; T1+E+EOS), images before or after the text, with and
#: without the connecting strings; the last one is the paper's choice.
PROMPT_ABLATION: list[list[str]] = [
    ["E"],
    ["T1", "E"],
    ["T1", "E", "EOS"],
    ["V", "E", "EOS"],
    ["E", "V", "EOS"],
    ["I1", "V", "T2", "E", "EOS"],
    ["T1", "E", "I2", "V", "EOS"],
]

PRESETS: dict[str, dict[str, Any]] = {
    "prompt": {"prompt.sequence": {"grid": PROMPT_ABLATION}},
    # image tokens before vs after the text, bare and with the connecting strings
    "image_position": {"prompt.sequence": {"grid": [["V", "E", "EOS"], ["E", "V", "EOS"],
                                                    ["I1", "V", "T2", "E", "EOS"], ["T1", "E", "I2", "V", "EOS"]]}},
    "num_images": {"model.num_images": {"grid": [0, 1, 2, 3]}},
    # rsLoRA with alpha = r, as in the paper
    "lora": {"model.lora.r": {"grid": [16, 64, 256]}, "model.lora.alpha": {"same_as": "model.lora.r"}},
    "lr": {"train.lr_backbone": {"loguniform": [1e-5, 1e-3]}, "train.lr_projection": {"loguniform": [1e-4, 1e-2]}},
    "margin": {"train.margin_min": {"grid": [0.05, 0.1]}, "train.margin_max": {"grid": [0.2, 0.3]}},
    # clustered hard negatives: early and small, the reference schedule, late and large
    "curriculum": {"train.cluster": {"grid": [
        {"start_epoch": 2, "refresh_every": 1, "initial_size": 8, "double_at": [4, 6, 8]},
        {"start_epoch": 4, "refresh_every": 2, "initial_size": 16, "double_at": [8, 12, 16, 20, 24]},
        {"start_epoch": 8, "refresh_every": 4, "initial_size": 32, "double_at": [16, 24]},
    ]}},
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"invalid value for 'tune.presets': unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
