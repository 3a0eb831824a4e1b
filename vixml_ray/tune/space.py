"""The search space of a sweep: ``tune.presets`` + ``tune.space`` parsed, validated against the config schema, turned
into Ray Tune's param space, and a trial's choices applied to the base config.

Keys are dotted config keys (a field, or a whole section whose values are partial mappings). Nested mappings are
accepted too (``tune.space.train.lr_backbone.loguniform=[1e-4,1e-2]`` on the command line nests them). Every error
names the key. Keys that change what the driver prepares once for all trials (dataset, image features, Ray, the
sweep itself) or a trial's resources (which size the sweep's concurrency) cannot be swept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vixml_ray.config import Config, flatten, replace
from vixml_ray.errors import ConfigError
from vixml_ray.tune.presets import preset

KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "same_as")
FIXED_PREFIXES = ("tune.", "ray.", "data.", "vision.")
FIXED_KEYS = ("tune", "ray", "data", "vision", "out_dir", "cache_dir", "train.num_workers", "train.cpus_per_worker",
              "train.use_gpu")
IMAGE_PART = "V"


@dataclass(frozen=True)
class Spec:
    """One swept key; ``args``: the values of a grid/choice, ``(low, high)`` of a range, the source key of same_as."""

    key: str
    kind: str
    args: Any


@dataclass(frozen=True)
class SearchSpace:
    """The swept keys of a sweep, in order."""

    specs: tuple[Spec, ...]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.specs]

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space`` (flat dotted keys; same_as keys are derived in :meth:`choices`)."""
        from ray import tune

        make = {"grid": tune.grid_search, "choice": tune.choice}
        ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
        space: dict[str, Any] = {}
        for spec in self.specs:
            if spec.kind in make:
                space[spec.key] = make[spec.kind](list(spec.args))
            elif spec.kind in ranges:
                space[spec.key] = ranges[spec.kind](*spec.args)
        return space

    def num_trials(self, num_samples: int) -> int:
        """Trials of a full sweep: the grid's size times ``num_samples`` (Tune's basic variant generator)."""
        size = num_samples
        for spec in self.specs:
            if spec.kind == "grid":
                size *= len(spec.args)
        return size

    def choices(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's value of every swept key (same_as keys copied from their source), in the space's order."""
        out = {}
        for spec in self.specs:
            source = spec.args if spec.kind == "same_as" else spec.key
            if source not in trial_config:
                raise KeyError(f"the trial's config has no value for '{source}' (was the sweep's space changed?)")
            out[spec.key] = trial_config[source]
        return out


def apply_choices(cfg: Config, choices: Mapping[str, Any]) -> Config:
    """``cfg`` with a trial's choices set. A swept prompt without image tokens is the ablation's text-only arm: it
    turns ``model.use_images`` off (the model rejects images without a place in the prompt)."""
    try:
        out = replace(cfg, **dict(choices))
    except ConfigError as err:
        raise ConfigError(f"tune.space: the choices {dict(choices)} give an invalid config: {err}") from err
    if "prompt.sequence" in choices and IMAGE_PART not in out.prompt.sequence and out.model.use_images:
        out = replace(out, **{"model.use_images": False})
    return out


def search_space(cfg: Config) -> SearchSpace:
    """The validated space of ``cfg.tune``: the presets in order, then ``tune.space`` (a later spec of a key wins)."""
    merged: dict[str, Any] = {}
    for name in cfg.tune.presets:
        merged.update(_flatten(preset(name), f"preset '{name}'"))
    merged.update(_flatten(cfg.tune.space, "tune.space"))
    if not merged:
        raise ConfigError("tune.space is empty and tune.presets names none: nothing to sweep "
                          "(e.g. tune.presets=[prompt])")
    specs = {key: _parse(key, raw) for key, raw in merged.items()}
    for spec in specs.values():
        _check(cfg, spec, specs)
    return SearchSpace(tuple(specs.values()))


def _flatten(node: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Dotted key -> spec mapping; a mapping of mappings that names no spec kind is a namespace of further keys."""
    def is_spec(value: Any) -> bool:
        return isinstance(value, Mapping) and bool(set(value) & set(KINDS)
                                                   or not all(isinstance(v, Mapping) for v in value.values()))

    out = flatten(node, is_spec)
    for key, value in out.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: '{key}' must map to a spec such as {{grid: [...]}}, got {value!r}")
    return out


def _parse(key: str, raw: Mapping[str, Any]) -> Spec:
    where = f"tune.space: '{key}'"
    if key in FIXED_KEYS or key.startswith(FIXED_PREFIXES):
        raise ConfigError(f"{where} cannot be swept: the driver prepares data, features and Ray once for all trials "
                          "and sizes the concurrency from one trial's resources; set it outside the space")
    if len(raw) != 1:
        raise ConfigError(f"{where} needs exactly one of {', '.join(KINDS)}, got {sorted(raw)}")
    kind, args = next(iter(raw.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{where}: '{kind}' needs a non-empty list of values, got {args!r}")
        return Spec(key, kind, tuple(args))
    if kind in ("uniform", "loguniform", "randint"):
        if (not isinstance(args, (list, tuple)) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise ConfigError(f"{where}: '{kind}' needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"{where}: '{kind}' needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: 'loguniform' needs low > 0, got {low}")
        if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{where}: 'randint' needs integer bounds, got [{low}, {high}]")
        return Spec(key, kind, (low, high))
    if kind == "same_as":
        return Spec(key, kind, str(args))
    raise ConfigError(f"{where}: unknown spec '{kind}' (specs: {', '.join(KINDS)})")


def _check(cfg: Config, spec: Spec, specs: Mapping[str, Spec]) -> None:
    """Every value the spec can give (a range: both ends) must make a valid config when set on ``cfg`` alone."""
    if spec.kind == "same_as":
        source = specs.get(spec.args)
        if source is None or source.kind == "same_as":
            raise ConfigError(f"tune.space: '{spec.key}': same_as '{spec.args}' must name another swept key that is "
                              f"not itself same_as (swept: {', '.join(specs)})")
        values = _extremes(source)
    else:
        values = _extremes(spec)
    for value in values:
        try:
            replace(cfg, **{spec.key: value})
        except ConfigError as err:
            raise ConfigError(f"tune.space: '{spec.key}' value {value!r} is invalid: {err}") from err


def _extremes(spec: Spec) -> tuple[Any, ...]:
    """The values of a grid/choice; the ends of a range (Tune's randint excludes ``high``)."""
    if spec.kind == "randint":
        return spec.args[0], spec.args[1] - 1
    return tuple(spec.args)
