"""The Siamese ViXML embedder: prompt assembly with early visual fusion, a backbone, pooling, L2 normalisation.

One module embeds queries and labels alike. Each image feature vector (one pooled vector per image, from the frozen
vision tower's feature cache) is mapped by a learned ``Linear(image_dim, hidden)`` to one token embedding and placed
at the template's ``V`` position; the whole sequence reaches the backbone as ``inputs_embeds``. The projection always
trains fully; the backbone trains fully or through LoRA.

An export directory (:meth:`Embedder.save_export`, :func:`load_export`) holds only what training changed
(``trainable.safetensors``: adapter + projection, or every weight for a full fine-tune), ``config.yaml`` (the
resolved config) and ``export.json``; the base weights are re-loaded from ``model.name_or_path``.

With ``model.prototypes.enabled`` the embedder also owns the PRIME label prototypes
(:class:`~vixml_ray.model.prototypes.LabelPrototypes`): :meth:`Embedder.label_vectors` turns label text embeddings
into the vectors labels are scored with; the export then records ``num_labels`` and carries the prototypes' weights
and buffers (label clusters, centroids).

With ``model.classifiers.enabled`` a trained model also carries per-label classifier vectors
(:class:`~vixml_ray.model.classifiers.LabelClassifiers`, set by the training's classifier stage through
:meth:`Embedder.set_classifiers`): :meth:`Embedder.label_vectors` then serves them (fused with the Siamese vector),
and the export records ``num_labels``, ``classifiers: true`` and carries the vectors.

With ``model.lexical.enabled`` a trained model also carries the sparse lexical head
(:class:`~vixml_ray.model.lexical.LexicalHead`, fitted at the end of training into :attr:`Embedder.lexical`): the
export then holds its files and records ``lexical: true``. :func:`load_export` leaves it out (embedding never
needs it); whoever ranks loads it alone (:meth:`vixml_ray.inference.export.Export.lexical_head`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from vixml_ray import storage
from vixml_ray.config import Config, read_config, to_yaml
from vixml_ray.errors import ConfigError, IncompatibleArtifactError, MissingPathError
from vixml_ray import devices
from vixml_ray.model.backbone import load_backbone
from vixml_ray.model.classifiers import LabelClassifiers
from vixml_ray.model.lexical import LexicalHead
from vixml_ray.model.prompt import IMAGE_KIND, Layout, build_template
from vixml_ray.model.prototypes import LabelPrototypes

WEIGHTS_FILE, CONFIG_FILE, EXPORT_FILE = "trainable.safetensors", "config.yaml", "export.json"
EXPORT_FORMAT = 1


class Embedder(nn.Module):
    """``forward(text_ids, text_lengths, image_feats=None, image_mask=None) -> float32 [B, hidden]``, unit norm
    (computed in ``model.compute_dtype``, pooled in fp32)."""

    def __init__(self, cfg: Config, image_dim: int | None, num_labels: int | None = None):
        super().__init__()
        model_cfg = cfg.model
        if model_cfg.use_images and image_dim is None:
            raise ConfigError("'model.use_images' is true but no image feature dimension was given")
        backbone = load_backbone(model_cfg, cfg.cache_dir)
        self.cfg = cfg
        self.kind = backbone.kind
        self.tokenizer = backbone.tokenizer
        self.hidden_size = backbone.hidden_size
        self.pooling = model_cfg.pooling
        self.template = build_template(backbone.kind, cfg.prompt, backbone.tokenizer)
        self.use_images = model_cfg.use_images and model_cfg.num_images > 0
        if self.use_images and not self.template.has_images:
            raise ConfigError(f"'model.use_images' is true but 'prompt.sequence' {cfg.prompt.sequence} has no 'V'")
        self.num_images = model_cfg.num_images if self.use_images else 0
        self.image_dim = image_dim if self.use_images else None
        longest = self.template.num_constant_tokens + model_cfg.max_length + self.num_images
        if backbone.max_positions is not None and longest > backbone.max_positions:
            raise ConfigError(f"'model.max_length'={model_cfg.max_length}: prompt sequences reach {longest} "
                              f"positions, more than the model's {backbone.max_positions}")
        self.backbone = backbone.model
        self.projection = nn.Linear(image_dim, self.hidden_size) if self.image_dim is not None else None
        self.prototypes: LabelPrototypes | None = None
        self.label_catalogue: str | None = None  # the label set the per-label vectors index (Dataset.label_catalogue)
        # per-label classifier vectors: none until the classifier stage (or an export) sets them
        self.classifiers: LabelClassifiers | None = None
        self.lexical: LexicalHead | None = None  # the sparse lexical head: none until fitted (or loaded)
        if model_cfg.prototypes.enabled:
            if num_labels is None:
                raise ConfigError("'model.prototypes.enabled' is true but the number of labels was not given")
            self.prototypes = LabelPrototypes(model_cfg.prototypes, num_labels, self.hidden_size)

    @property
    def num_labels(self) -> int | None:
        """The label count the per-label parts (prototypes, classifiers, lexical head) were built for (None without
        them)."""
        for part in (self.prototypes, self.classifiers, self.lexical):
            if part is not None:
                return part.num_labels
        return None

    def set_classifiers(self, weight: torch.Tensor, trained: torch.Tensor) -> None:
        """Attaches (or replaces) the per-label classifier vectors (float [L, H]) and which labels have one (bool
        [L]); needs ``model.classifiers.enabled``."""
        if not self.cfg.model.classifiers.enabled:
            raise ConfigError("classifier vectors need 'model.classifiers.enabled'")
        if self.prototypes is not None and len(weight) != self.prototypes.num_labels:
            raise ValueError(f"{len(weight)} classifier vectors for {self.prototypes.num_labels} prototype labels")
        if self.classifiers is None or self.classifiers.num_labels != len(weight):
            device = next(self.parameters()).device
            self.classifiers = LabelClassifiers(self.cfg.model.classifiers, len(weight), self.hidden_size).to(device)
        self.classifiers.set_vectors(weight, trained)

    # ----------------------------------------------------------------------------------------------- forward
    def assemble(self, text_ids: torch.Tensor, text_lengths: torch.Tensor, image_feats: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Layout]:
        """``inputs_embeds`` [B, T, hidden] of the packed prompt sequences and their :class:`Layout`."""
        if text_lengths.numel() and int(text_lengths.max()) > text_ids.shape[1]:
            raise ValueError(f"text_lengths up to {int(text_lengths.max())} exceed text_ids width {text_ids.shape[1]}")
        if not self.use_images or image_feats is None:
            image_feats = image_mask = None
        else:
            image_feats = image_feats[:, : self.num_images]
            if image_mask is None:
                image_mask = torch.ones(image_feats.shape[:2], dtype=torch.bool, device=image_feats.device)
            image_mask = image_mask[:, : self.num_images].to(torch.bool)
        layout = self.template.layout(text_ids, text_lengths, image_mask)
        embeds = self.backbone.get_input_embeddings()(layout.token_ids)  # ids are 0 on image and pad positions
        if image_feats is not None:
            # zero the missing slots so that nothing (not even NaN) from them reaches outputs or gradients
            feats = image_feats.to(self.projection.weight.dtype).masked_fill(~image_mask[..., None], 0.0)
            projected = self.projection(feats).to(embeds.dtype)  # [B, S, hidden]
            slot = layout.image_slot.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1])
            image_embeds = projected.gather(1, slot)
            embeds = torch.where((layout.kind == IMAGE_KIND)[..., None], image_embeds, embeds)
        return embeds, layout

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The mixed-precision context of this model's forward on ``device`` (``model.compute_dtype``, see
        :mod:`vixml_ray.devices`)."""
        return devices.autocast(self.cfg.model.compute_dtype, self.cfg.model.dtype, device)

    def forward(self, text_ids: torch.Tensor, text_lengths: torch.Tensor, image_feats: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast(text_ids.device):
            embeds, layout = self.assemble(text_ids, text_lengths, image_feats, image_mask)
            mask = layout.attention_mask
            extra = {"use_cache": False} if self.kind == "decoder" else {}
            hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, **extra).last_hidden_state
        return F.normalize(pool(hidden.float(), layout.lengths, self.pooling), dim=-1)

    def label_vectors(self, text_emb: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        """The vectors labels are scored with: their prototypes when the model has them, else ``text_emb``; with
        classifier vectors, those fused with it (:class:`~vixml_ray.model.classifiers.LabelClassifiers`)."""
        vectors = text_emb
        if self.prototypes is not None:
            with self.autocast(text_emb.device):
                vectors = self.prototypes(text_emb, label_rows)
        if self.classifiers is not None:
            vectors = self.classifiers(vectors, label_rows)
        return vectors

    # ---------------------------------------------------------------------------------------------- training
    def param_groups(self, lr_backbone: float, lr_projection: float, weight_decay: float,
                     lr_prototypes: float | None = None) -> list[dict]:
        """AdamW groups: backbone at ``lr_backbone``, the prototypes' free vectors and combiner at ``lr_prototypes``
        (default ``lr_projection``), the projection (and anything else) at ``lr_projection``; no weight decay on
        biases and norm weights (every parameter with fewer than 2 dims)."""
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim >= 2 and "norm" not in name.lower()
            part = name.split(".", 1)[0]
            groups.setdefault((part if part in ("backbone", "prototypes") else "projection", decay), []).append(param)
        lrs = {"backbone": lr_backbone, "projection": lr_projection,
               "prototypes": lr_projection if lr_prototypes is None else lr_prototypes}
        return [
            {"name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": lrs[part],
             "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
        ]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs: every trainable tensor (adapter + projection, or all for a full fine-tune) and
        the buffers of the prototypes (label clusters, centroids) and of the classifiers (vectors)."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        for prefix, part in (("prototypes", self.prototypes), ("classifiers", self.classifiers)):
            if part is not None:
                state.update({f"{prefix}.{name}": b.detach() for name, b in part.named_buffers()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a :meth:`trainable_state_dict`; its keys must be exactly this model's trainable parameters."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"trainable state mismatch: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)})")
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------------------------------------ export
    def save_export(self, directory: str, overwrite: bool = False) -> None:
        """Publishes the trainable weights and the resolved config at ``directory`` (local path or URI)."""
        tensors = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with storage.publish(str(directory), overwrite=overwrite) as staging:
            weights = save_safetensors(tensors, metadata={"format": "pt"})
            storage.write_bytes(storage.join(staging, WEIGHTS_FILE), weights)
            storage.write_text(storage.join(staging, CONFIG_FILE), to_yaml(self.cfg))
            if self.lexical is not None:
                self.lexical.save(staging)
            storage.write_json(storage.join(staging, EXPORT_FILE), {
                "format": EXPORT_FORMAT, "image_dim": self.image_dim, "kind": self.kind,
                "hidden_size": self.hidden_size, "num_tensors": len(tensors), "num_labels": self.num_labels,
                "label_catalogue": self.label_catalogue, "classifiers": self.classifiers is not None,
                "lexical": self.lexical is not None,
            })


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Mean over the first ``lengths[b]`` positions of each row, or the last of them (``how="last"``)."""
    if how == "last":
        index = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return hidden.gather(1, index).squeeze(1)
    if how == "mean":
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        summed = (hidden * mask[..., None].to(hidden.dtype)).sum(1)
        return summed / lengths.clamp(min=1)[:, None].to(hidden.dtype)
    raise ValueError(f"unknown pooling '{how}' (mean, last)")


def build_embedder(cfg: Config, image_dim: int | None, num_labels: int | None = None) -> Embedder:
    """The embedder of ``cfg`` (``image_dim``: the image feature size, or None for a text-only model; ``num_labels``:
    the label count, needed with ``model.prototypes.enabled``)."""
    return Embedder(cfg, image_dim, num_labels)


def load_export(directory: str) -> Embedder:
    """The embedder saved by :meth:`Embedder.save_export` (base weights re-loaded from ``model.name_or_path``)."""
    root = storage.resolve(str(directory))
    meta_uri = storage.join(root, EXPORT_FILE)
    if not storage.exists(meta_uri):
        raise MissingPathError(meta_uri, f"{directory}: not an embedder export (no {EXPORT_FILE})")
    meta = storage.read_json(meta_uri)
    if meta.get("format") != EXPORT_FORMAT:
        raise IncompatibleArtifactError(f"{meta_uri}: unsupported export format {meta.get('format')} "
                                        f"(expected {EXPORT_FORMAT})")
    cfg = read_config(storage.join(root, CONFIG_FILE))
    if cfg.model.prototypes.enabled and not meta.get("num_labels"):
        raise IncompatibleArtifactError(f"{meta_uri}: the model has label prototypes but no 'num_labels'")
    embedder = build_embedder(cfg, meta["image_dim"], meta.get("num_labels"))
    embedder.label_catalogue = meta.get("label_catalogue")
    state = load_safetensors(storage.read_bytes(storage.join(root, WEIGHTS_FILE)))
    if meta.get("classifiers"):
        embedder.set_classifiers(state["classifiers.weight"], state["classifiers.trained"])
    embedder.load_trainable_state_dict(state)
    return embedder
