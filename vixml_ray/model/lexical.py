"""The sparse lexical head (``model.lexical``): per-label linear classifiers over TF-IDF word n-grams of the query
text, the signal the linear XMC models (PECOS, omikuji) rank with, added to the dense model's scores of each query's
candidate labels.

``h(q, l) = x_q . w_l + b_l`` for a label with a classifier, :data:`UNTRAINED` (-1, the margin every negative is
trained to: no lexical evidence) without one; ``x_q`` is the query text's TF-IDF vector
(sublinear tf, smooth idf, L2-normalised; scikit-learn's ``TfidfVectorizer`` with the vocabulary and idf learnt on
the training queries). ``w_l`` is sparse: a classifier trained on a few queries has weights only on their n-grams.
:mod:`vixml_ray.train.lexical` trains it; :mod:`vixml_ray.index.raa` adds ``weight * h`` to the candidates' scores.

Saved beside the embedder in its export (:data:`WEIGHTS_FILE`: the CSR weight matrix, bias, idf and which labels
have a classifier; :data:`VOCABULARY_FILE`: the n-gram vocabulary) and loaded alone by whoever ranks (the
evaluation driver, the predictor, the service's ingress) with :func:`load_lexical`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sklearn.feature_extraction.text import TfidfVectorizer

from vixml_ray import storage
from vixml_ray.config import LexicalConfig
from vixml_ray.errors import IncompatibleArtifactError

WEIGHTS_FILE, VOCABULARY_FILE = "lexical.safetensors", "lexical.json"
# h of a label without a classifier. 0 would rank it above every label whose classifier says "not this query" (on
# nameless dnb, weight 0.1, hard negatives only: 44.4 P@1 with 0 against 44.8 with -1, mean of 3 seeds' test with RAA)
UNTRAINED = -1.0


def make_vectorizer(cfg: LexicalConfig, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    """The TF-IDF featuriser of ``cfg`` (unfitted, or over a fixed ``vocabulary``)."""
    return TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=True, dtype=np.float32,
                           vocabulary=vocabulary)


class LexicalHead:
    """The fitted head: ``features(texts)`` and ``pair_scores(features, rows, labels)``."""

    def __init__(self, cfg: LexicalConfig, vocabulary: dict[str, int], idf: np.ndarray, weights: sp.csr_matrix,
                 bias: np.ndarray, trained: np.ndarray):
        num_labels, num_features = weights.shape
        if len(idf) != num_features or len(vocabulary) != num_features:
            raise ValueError(f"{len(vocabulary)} n-grams and {len(idf)} idf values for {num_features} weight columns")
        if len(bias) != num_labels or len(trained) != num_labels:
            raise ValueError(f"{len(bias)} biases and {len(trained)} flags for {num_labels} labels")
        self.cfg = cfg
        self.vectorizer = make_vectorizer(cfg, vocabulary)
        self.vectorizer.idf_ = np.asarray(idf, dtype=np.float32)
        self.weights = sp.csr_matrix(weights, dtype=np.float32)
        self.weights.sum_duplicates()  # canonical: sorted n-grams within each label's row
        # each stored weight's (label, n-gram) as one sorted int64 key: a pair's score looks up the query's few
        # n-grams in its label's row, never copying the row (popular labels have tens of thousands of n-grams); a
        # last key above every real one (value 0) is where a search for an absent pair may land
        self._keys = np.append(np.repeat(np.arange(num_labels, dtype=np.int64), np.diff(self.weights.indptr))
                               * num_features + self.weights.indices, np.iinfo(np.int64).max)
        self._values = np.append(self.weights.data, np.float32(0.0))
        self.bias = np.where(trained, bias, 0.0).astype(np.float32)
        self.trained = np.asarray(trained, dtype=bool)

    @property
    def num_labels(self) -> int:
        return self.weights.shape[0]

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        """float32 [len(texts), n-grams] TF-IDF rows (an empty or unknown text is a zero row)."""
        return self.vectorizer.transform(list(texts)).tocsr()

    def pair_scores(self, features: sp.csr_matrix, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``h(q, l)`` (float64) of each pair (``rows`` index ``features``, ``labels`` the label ids; -1 for a label
        without a classifier)."""
        rows, labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise IndexError(f"label ids outside [0, {self.num_labels})")
        if not len(rows):
            return np.zeros(0)
        query = features[rows]  # the pairs' query n-grams (a query has a few), one row per pair
        pair = np.repeat(np.arange(len(rows)), np.diff(query.indptr))
        keys = labels[pair] * self.weights.shape[1] + query.indices
        at = np.searchsorted(self._keys, keys)
        products = np.where(self._keys[at] == keys, self._values[at], 0.0) * query.data
        dots = np.bincount(pair, weights=products.astype(np.float64), minlength=len(rows))
        return np.where(self.trained[labels], dots + self.bias[labels], UNTRAINED)

    def save(self, directory: str) -> None:
        """Writes the head's two files into ``directory`` (a staging directory: the caller publishes)."""
        w = self.weights
        arrays = {"indptr": w.indptr.astype(np.int64), "indices": w.indices.astype(np.int64),
                  "data": w.data.astype(np.float32), "bias": self.bias, "trained": self.trained.astype(np.uint8),
                  "idf": np.asarray(self.vectorizer.idf_, dtype=np.float32)}
        storage.write_bytes(storage.join(directory, WEIGHTS_FILE),
                            save_safetensors(arrays, metadata={"shape": f"{w.shape[0]},{w.shape[1]}"}))
        vocabulary = sorted(self.vectorizer.vocabulary_.items(), key=lambda item: item[1])
        storage.write_json(storage.join(directory, VOCABULARY_FILE),
                           {"ngram_max": self.cfg.ngram_max, "ngrams": [term for term, _ in vocabulary]})


def load_lexical(directory: str, cfg: LexicalConfig) -> LexicalHead:
    """The head saved by :meth:`LexicalHead.save` in ``directory`` (an export)."""
    weights_uri, vocabulary_uri = storage.join(directory, WEIGHTS_FILE), storage.join(directory, VOCABULARY_FILE)
    for uri in (weights_uri, vocabulary_uri):
        if not storage.exists(uri):
            raise IncompatibleArtifactError(f"{uri} is missing: the export's config has 'model.lexical.enabled' but "
                                            "no lexical head was saved with it")
    arrays = load_safetensors(storage.read_bytes(weights_uri))
    vocabulary = storage.read_json(vocabulary_uri)
    if vocabulary.get("ngram_max") != cfg.ngram_max:
        raise IncompatibleArtifactError(f"{vocabulary_uri}: n-grams up to {vocabulary.get('ngram_max')}, the config "
                                        f"says 'model.lexical.ngram_max'={cfg.ngram_max}")
    terms = vocabulary["ngrams"]
    num_labels = len(arrays["bias"])
    weights = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=(num_labels, len(terms)))
    return LexicalHead(cfg, {term: i for i, term in enumerate(terms)}, arrays["idf"], weights, arrays["bias"],
                       arrays["trained"].astype(bool))
