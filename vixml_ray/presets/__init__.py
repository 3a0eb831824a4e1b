"""The shipped config presets (YAML): resolved by name by :func:`vixml_ray.config.resolve_preset`."""
