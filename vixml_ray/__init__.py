"""ViXML on Ray.

The package is layered; a module imports only from its own layer and the layers below it (``tests/test_layers.py``
parses every import, lazy ones included, and fails on an upward import or an import cycle). Bottom to top:

* ``errors``, ``devices`` (torch dtypes and devices), ``storage`` (paths/URIs, atomic publishing),
  ``config`` (+ ``presets``), ``ray_utils``
* ``data`` (dataset layout, schemas, preparation) -> ``vision`` (image features) -> ``model`` (the embedder)
* ``inference`` (reading an export, batch embedding, query images)
* ``index`` (versioned label vectors, shard actors, exact top-k, refresh)
* ``eval`` (metrics, evaluation) -> ``train`` (Ray Train) -> ``pipeline`` (dataset + features + train) -> ``tune``
* ``predict`` (the in-process predictor, JSONL prediction) -> ``serve`` (online serving)
* ``demo``, ``cli`` (the jobs' library side); ``jobs/`` and ``bench/`` sit on top of the package.
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "devices"),
    ("storage",),
    ("config", "presets"),
    ("ray_utils",),
    ("data",),
    ("vision",),
    ("model",),
    ("inference",),
    ("index",),
    ("eval",),
    ("train",),
    ("pipeline",),
    ("tune",),
    ("predict",),
    ("serve",),
    ("demo",),
    ("cli",),
)
