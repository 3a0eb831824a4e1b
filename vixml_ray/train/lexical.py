"""Training the sparse lexical head (``model.lexical``, :mod:`vixml_ray.model.lexical`) at the end of training.

One-vs-rest, as NGAME's second stage: label ``l``'s classifier (liblinear, squared hinge, ``C = model.lexical.c``)
separates its training queries from the training queries whose top ``negatives`` labels under the final dense model
contain ``l`` without it being theirs (the hard negatives) and from ``random_negatives`` training queries drawn
uniformly (which calibrate ``h`` across labels: a classifier that has only seen near-misses scores an unrelated
query arbitrarily), over the n-grams those queries have (so ``w_l`` is sparse). The work is queries x (negatives +
random_negatives), not queries x labels. A label with fewer than ``min_queries`` training queries gets no classifier
(h = -1, :data:`~vixml_ray.model.lexical.UNTRAINED`). Runs in the process that exports (rank 0).
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from tqdm.auto import tqdm

from vixml_ray.config import LexicalConfig
from vixml_ray.model.lexical import LexicalHead, make_vectorizer

log = logging.getLogger(__name__)


def confusion_matrix(shortlist: np.ndarray, num_labels: int) -> sp.csc_matrix:
    """bool CSC (queries x labels): which labels are among each query's top ``negatives`` (``shortlist`` int
    [queries, negatives], -1 padded)."""
    valid = shortlist >= 0
    rows = np.repeat(np.arange(len(shortlist)), valid.sum(axis=1))
    return sp.csc_matrix((np.ones(len(rows), dtype=bool), (rows, shortlist[valid])),
                         shape=(len(shortlist), num_labels))


def fit_lexical(cfg: LexicalConfig, texts: list[str], labels: sp.csr_matrix, shortlist: np.ndarray,
                seed: int, progress: bool = False) -> LexicalHead:
    """The head trained on the training ``texts`` with their ``labels`` (CSR [queries, labels]) and each query's top
    labels under the final dense model (``shortlist`` int [queries, >= 1], -1 padded)."""
    if len(texts) != labels.shape[0] or len(shortlist) != labels.shape[0]:
        raise ValueError(f"{len(texts)} texts, {labels.shape[0]} label rows and {len(shortlist)} shortlists")
    start = time.perf_counter()
    vectorizer = make_vectorizer(cfg)
    try:
        features = vectorizer.fit_transform(texts).tocsr()
    except ValueError as err:  # scikit-learn: "empty vocabulary; perhaps the documents only contain stop words"
        raise ValueError(f"model.lexical: no n-gram in at least {cfg.min_df} training queries ({err})") from err
    num_labels = labels.shape[1]
    positives = sp.csc_matrix(labels, dtype=bool)
    confused = confusion_matrix(np.asarray(shortlist), num_labels)
    counts = np.diff(positives.indptr)
    rng = np.random.default_rng(seed)
    rows_out, cols_out, data_out = [], [], []
    bias = np.zeros(num_labels, dtype=np.float32)
    trained = np.zeros(num_labels, dtype=bool)
    candidates = np.flatnonzero(counts >= cfg.min_queries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for label in tqdm(candidates, desc="lexical head", unit="label", disable=not progress):
            pos = positives.indices[positives.indptr[label]:positives.indptr[label + 1]]
            hard = confused.indices[confused.indptr[label]:confused.indptr[label + 1]]
            neg = np.setdiff1d(np.union1d(hard, rng.integers(0, len(texts), cfg.random_negatives)), pos,
                               assume_unique=True)
            if not len(neg):
                continue
            sub = features[np.concatenate([pos, neg])]
            columns = np.unique(sub.indices)
            target = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
            model = LinearSVC(C=cfg.c, loss="squared_hinge", dual=True, random_state=seed, max_iter=1000)
            model.fit(sub[:, columns], target)
            weight = model.coef_.ravel().astype(np.float32)
            keep = weight != 0
            rows_out.append(np.full(int(keep.sum()), label))
            cols_out.append(columns[keep])
            data_out.append(weight[keep])
            bias[label] = float(model.intercept_[0])
            trained[label] = True
    concat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
    weights = sp.csr_matrix((concat(data_out, np.float32), (concat(rows_out, np.int64), concat(cols_out, np.int64))),
                            shape=(num_labels, features.shape[1]))
    log.info("lexical head: %d of %d labels with a classifier, %d n-grams, %d weights, %.1f s", int(trained.sum()),
             num_labels, features.shape[1], weights.nnz, time.perf_counter() - start)
    return LexicalHead(cfg, vectorizer.vocabulary_, vectorizer.idf_, weights, bias, trained)
