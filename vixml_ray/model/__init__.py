"""The ViXML embedder: backbones (HF encoders/decoders, LoRA), prompt templates, early visual fusion, pooling.

Public API::

    build_embedder(cfg, image_dim, num_labels=None) -> Embedder  # forward(ids, lengths, image_feats, image_mask)
    embedder.label_vectors(text_emb, label_rows)    # model.prototypes / model.classifiers vectors of labels
    load_export(directory) -> Embedder
    load_tokenizer(cfg.model, cfg.cache_dir)
    tokenize(tokenizer, texts, max_length) -> TokenArrays;  save_tokens / load_tokens
    embed_arrays(embedder, tokens, images, rows, batch_size) -> np.ndarray;  array_images(feats, mask)
"""

from vixml_ray.model.backbone import load_tokenizer, resolve_source
from vixml_ray.model.embedder import Embedder, build_embedder, load_export
from vixml_ray.model.inference import array_images, embed_arrays
from vixml_ray.model.tokens import TokenArrays, load_tokens, save_tokens, tokenize

__all__ = [
    "Embedder", "TokenArrays", "array_images", "build_embedder", "embed_arrays", "load_export", "load_tokenizer",
    "load_tokens", "resolve_source", "save_tokens", "tokenize",
]
