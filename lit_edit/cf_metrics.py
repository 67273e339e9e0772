"""Generation-based CounterFact metrics (docs/metrics.md): free-generation efficacy, fluency and consistency.

* **Free-generation efficacy** (``gen_exact``, ``gen_prefix``; ``para.gen_exact``, ``para.gen_prefix`` for the
  paraphrases): greedy continuation of the rewrite prompt (and of each paraphrase) for as many tokens as the new
  target has (``target_ids(" " + target_new)``, the tokens the edit trained). *Exact*: the continuation is the
  target, token for token. *Prefix*: its first token is the target's first token. Any record kind
  (CounterFact, ZsRE, the fact world).
* **Fluency** (ROME/MEMIT "generation entropy", GE): for each generation prompt one continuation (top-k 5
  sampling) to ``generation_length`` tokens, prompt included; per text the entropy in bits of its word bigram
  and trigram frequencies, ``mean(2/3·H2, 4/3·H3)`` as the reference code computes it (``weights="paper"``:
  ``2/3·H2 + 4/3·H3``, the papers' formula, twice the code's); mean over texts, then over records.
* **Consistency** (reference score, RS): TF-IDF cosine between the record's generations joined by spaces and
  the reference texts about the new object (``attribute_snippets.json`` entries of ``(relation_id,
  target_new.id)``), with a fixed vocabulary and IDF (``idf.npy``, ``tfidf_vocab.json``): ROME's files, or
  the fact world's own (:mod:`lit_edit.world.references`).

Fluency and consistency read the same generations (made once, batched across records, each prompt sampling
from its own seeded generator); only records with ``generation_prompts`` have them.
"""
from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lit_edit.generation import generate_ids
from lit_edit.requests import EditRequest, EditRequestError
from lit_edit.tokens import bos_ids, context_length, encode, target_ids

FREE_KEYS = ("gen_exact", "gen_prefix", "para.gen_exact", "para.gen_prefix")
FLUENCY_WEIGHTS = {"reference": (2 / 3, 4 / 3, "mean"), "paper": (2 / 3, 4 / 3, "sum")}
WORD_TOKENIZERS = ("regex", "nltk")
SNIPPETS_FILE, IDF_FILE, VOCAB_FILE = "attribute_snippets.json", "idf.npy", "tfidf_vocab.json"


# --------------------------------------------------------------------------------------------
# Free-generation efficacy
# --------------------------------------------------------------------------------------------


def free_generation_scores(model, tok, requests: list[EditRequest], batch_size: int = 16) -> list[dict[str, float]]:
    """Per request ``gen_exact`` / ``gen_prefix`` (rewrite prompt) and ``para.gen_exact`` / ``para.gen_prefix``
    (mean over its paraphrases; absent without any), each in [0, 1]."""
    prompts, limits, where, wanted = [], [], [], []
    for k, r in enumerate(requests):
        target = target_ids(tok, r.target_new)
        for kind, prompt in [("", r.filled_prompt)] + [("para.", p) for p in r.paraphrase_prompts]:
            prompts.append(prompt), limits.append(len(target)), where.append((k, kind)), wanted.append(target)
    got = generate_ids(model, tok, prompts, limits, stop_ids=set(), batch_size=batch_size)
    table: list[dict[str, list[float]]] = [{} for _ in requests]
    for (k, kind), new, target in zip(where, got, wanted):
        table[k].setdefault(kind + "gen_exact", []).append(float(new == target))
        table[k].setdefault(kind + "gen_prefix", []).append(float(new[:1] == target[:1]))
    return [{key: sum(v) / len(v) for key, v in row.items()} for row in table]


# --------------------------------------------------------------------------------------------
# Fluency: n-gram entropy
# --------------------------------------------------------------------------------------------

# Words and punctuation, split like NLTK's word_tokenize (Treebank) on ordinary text: "don't" -> "do", "n't";
# "John's" -> "John", "'s"; hyphenated words and numbers (3.5, 1,000) stay whole; other punctuation one
# character per token. It differs on abbreviations ("U.S." -> "U.S", ".") and quotes (NLTK writes `` and '').
_WORD = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)\b|\w+(?:[-.,]\w+)*|\.\.\.|[^\w\s]", re.IGNORECASE)


def word_tokens(text: str, tokenizer: str = "regex") -> list[str]:
    """Word tokens of ``text``: :data:`_WORD` (``"regex"``) or NLTK's ``word_tokenize`` (``"nltk"``: needs the
    ``nltk`` package and its punkt data installed locally; never downloaded)."""
    if tokenizer == "regex":
        return _WORD.findall(text)
    if tokenizer != "nltk":
        raise ValueError(f"word tokenizer must be one of {WORD_TOKENIZERS}, got {tokenizer!r}")
    try:
        import nltk
    except ImportError as err:
        raise ImportError("word_tokenizer 'nltk' needs the nltk package (pip install nltk) and its punkt data") from err
    return nltk.word_tokenize(text)


def ngram_entropy(tokens: list[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``tokens`` (0 without any)."""
    counts = Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str, weights: str = "reference", tokenizer: str = "regex") -> float:
    """The weighted bigram and trigram entropy of one text: ``mean(2/3·H2, 4/3·H3)`` = ``H2/3 + 2·H3/3``
    (``"reference"``, ROME/MEMIT's code) or ``2/3·H2 + 4/3·H3`` (``"paper"``)."""
    if weights not in FLUENCY_WEIGHTS:
        raise ValueError(f"fluency weights must be one of {sorted(FLUENCY_WEIGHTS)}, got {weights!r}")
    w2, w3, how = FLUENCY_WEIGHTS[weights]
    tokens = word_tokens(text, tokenizer)
    terms = (w2 * ngram_entropy(tokens, 2), w3 * ngram_entropy(tokens, 3))
    return sum(terms) / (len(terms) if how == "mean" else 1)


# --------------------------------------------------------------------------------------------
# Consistency: TF-IDF cosine against reference texts
# --------------------------------------------------------------------------------------------

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern, on lower-cased text


class ReferenceFileError(ValueError):
    """A consistency reference file (snippets, IDF, vocabulary) that is missing or malformed; names the file."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


@dataclass
class Tfidf:
    """TF-IDF vectors over a fixed vocabulary (term -> index) and IDF, as ROME's vectoriser computes them:
    lower-cased words of two or more word characters, raw term counts × IDF (the L2 normalisation of the
    vectoriser does not change a cosine)."""

    vocab: dict[str, int]
    idf: list[float]

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[w] for w in _TFIDF_TOKEN.findall(text.lower()) if w in self.vocab)
        return {i: c * self.idf[i] for i, c in counts.items()}

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the TF-IDF vectors of ``a`` and ``b``; 0 when either has no vocabulary word (the reference
        divides by a zero norm there)."""
        va, vb = self.vector(a), self.vector(b)
        na, nb = math.sqrt(sum(x * x for x in va.values())), math.sqrt(sum(x * x for x in vb.values()))
        if not na or not nb:
            return 0.0
        return sum(x * vb.get(i, 0.0) for i, x in va.items()) / (na * nb)

    @classmethod
    def fit(cls, documents: list[str]) -> "Tfidf":
        """Vocabulary (sorted terms) and smoothed IDF ``ln((1 + n) / (1 + df)) + 1`` of ``documents``, as
        scikit-learn's ``TfidfVectorizer().fit`` computes them (ROME's recipe for its own files)."""
        df = Counter(t for d in documents for t in set(_TFIDF_TOKEN.findall(d.lower())))
        terms = sorted(df)
        n = len(documents)
        return cls({t: i for i, t in enumerate(terms)}, [math.log((1 + n) / (1 + df[t])) + 1 for t in terms])

    def save(self, directory: Path) -> None:
        import numpy as np

        np.save(directory / IDF_FILE, np.asarray(self.idf, dtype=np.float64))
        (directory / VOCAB_FILE).write_text(json.dumps(self.vocab, indent=1), encoding="utf-8")


def read_tfidf(idf_path, vocab_path) -> Tfidf:
    """ROME's ``idf.npy`` (1-D float array) and ``tfidf_vocab.json`` (term -> column of that array)."""
    import numpy as np

    for path in (idf_path, vocab_path):
        if not Path(path).is_file():
            raise ReferenceFileError(path, "not found (consistency needs ROME's idf.npy and tfidf_vocab.json)")
    try:
        idf = np.load(idf_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ReferenceFileError(idf_path, f"not a numpy .npy array ({err})") from err
    if idf.ndim != 1 or idf.dtype.kind not in "fiu" or not np.isfinite(idf).all():
        raise ReferenceFileError(idf_path, f"must hold a 1-D array of finite numbers, got {idf.dtype} {idf.shape}")
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise ReferenceFileError(vocab_path, f"must be a JSON object term -> index, got {type(vocab).__name__}")
    for term, index in vocab.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(idf):
            raise ReferenceFileError(vocab_path, f"term {term!r} has index {index!r}, not a column of the "
                                                 f"{len(idf)} IDF values in {idf_path}")
    return Tfidf(vocab, idf.astype(float).tolist())


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReferenceFileError(path, f"not readable as JSON ({err})") from err


def read_snippets(path) -> dict[tuple[str, str], list[str]]:
    """ROME's ``attribute_snippets.json``: a list of ``{"relation_id", "target_id", "samples": [{"name", "text"},
    ...]}``; returns ``(relation_id, target_id) -> [text, ...]`` (entries of one pair are joined in file order)."""
    if not Path(path).is_file():
        raise ReferenceFileError(path, "not found (consistency needs ROME's attribute_snippets.json)")
    data = _read_json(path)
    if not isinstance(data, list):
        raise ReferenceFileError(path, f"must be a JSON list of entries, got {type(data).__name__}")
    out: dict[tuple[str, str], list[str]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not {"relation_id", "target_id", "samples"} <= set(entry):
            raise ReferenceFileError(path, f"entry {i} must be an object with relation_id, target_id and samples")
        samples = entry["samples"]
        if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                    for s in samples):
            raise ReferenceFileError(path, f"entry {i} (relation {entry['relation_id']!r}, target "
                                           f"{entry['target_id']!r}): samples must be a list of {{name, text}}")
        out.setdefault((str(entry["relation_id"]), str(entry["target_id"])), []).extend(s["text"] for s in samples)
    return out


@dataclass
class References:
    """What consistency compares against: the reference texts per (relation, object id) and the TF-IDF."""

    snippets: dict[tuple[str, str], list[str]]
    tfidf: Tfidf
    source: str  # the directory, for error messages

    @classmethod
    def load(cls, directory) -> "References":
        """ROME's three files in ``directory`` (their names as ROME writes them: :data:`SNIPPETS_FILE`,
        :data:`IDF_FILE`, :data:`VOCAB_FILE`)."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise ReferenceFileError(d, f"not a directory (it should hold {SNIPPETS_FILE}, {IDF_FILE} and {VOCAB_FILE})")
        return cls(read_snippets(d / SNIPPETS_FILE), read_tfidf(d / IDF_FILE, d / VOCAB_FILE), str(d))

    def texts(self, r: EditRequest) -> list[str]:
        """The reference texts of ``r``'s new object; raises naming the record when there are none."""
        if not r.relation_id:
            raise EditRequestError(r.case_id, "relation_id", "missing: consistency needs it to find reference texts")
        if not r.target_new_id:
            raise EditRequestError(r.case_id, "target_new.id", "missing: consistency needs the new object's id")
        found = self.snippets.get((r.relation_id, r.target_new_id))
        if not found:
            raise EditRequestError(r.case_id, "target_new.id", f"no reference texts for relation "
                                   f"{r.relation_id!r} and object {r.target_new_id!r} in {self.source}/{SNIPPETS_FILE}")
        return found


@functools.lru_cache(maxsize=4)
def load_references(directory: str) -> References:
    """:meth:`References.load`, once per process and directory (ROME's snippets file is ~1 GB)."""
    return References.load(directory)


# --------------------------------------------------------------------------------------------
# Generations of a record
# --------------------------------------------------------------------------------------------


def record_seed(seed: int, case_id, j: int) -> int:
    """The sampling seed of a record's ``j``-th generation prompt: the same whichever rank or batch scores it."""
    return zlib.crc32(f"{seed}:{case_id!r}:{j}".encode())


def generations(model, tok, requests: list[EditRequest], *, n_prompts: int = 10, length: int = 100, top_k: int = 5,
                seed: int = 0, batch_size: int = 64) -> list[list[str]]:
    """Per request, one continuation of each of its first ``n_prompts`` generation prompts: sampled from the
    ``top_k`` most likely tokens (1: greedy), through EOS, until the text has ``length`` tokens with the prompt
    (and BOS) or fills the model's context; decoded with the prompt, NFKD-normalised, blank lines replaced by a
    space (ROME's ``generate_fast``)."""
    ctx = context_length(model)
    limit = min(length, ctx) if ctx is not None else length
    prompts, seqs, owner, seeds = [], [], [], []
    for k, r in enumerate(requests):
        for j, p in enumerate(r.generation_prompts[:n_prompts]):
            prompts.append(p), seqs.append(bos_ids(tok) + encode(tok, p)), owner.append(k)
            seeds.append(record_seed(seed, r.case_id, j))
    new = generate_ids(model, tok, prompts, [max(0, limit - len(s)) for s in seqs], top_k=top_k, seeds=seeds,
                       stop_ids=set(), batch_size=batch_size)
    out: list[list[str]] = [[] for _ in requests]
    for k, s, n in zip(owner, seqs, new):
        text = tok.decode(s + n, skip_special_tokens=True)
        out[k].append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return out


def generation_scores(model, tok, requests: list[EditRequest], *, fluency_on: bool = True,
                      references: References | None = None, n_prompts: int = 10, length: int = 100, top_k: int = 5,
                      seed: int = 0, weights: str = "reference", tokenizer: str = "regex",
                      batch_size: int = 64) -> list[dict[str, float]]:
    """Per request ``fluency`` (mean over its generations) and, with ``references``, ``consistency``; an empty
    dict for a record without generation prompts."""
    out = []
    for r, texts in zip(requests, generations(model, tok, requests, n_prompts=n_prompts, length=length, top_k=top_k,
                                              seed=seed, batch_size=batch_size)):
        row: dict[str, float] = {}
        if texts and fluency_on:
            row["fluency"] = sum(fluency(t, weights, tokenizer) for t in texts) / len(texts)
        if texts and references is not None:
            row["consistency"] = references.tfidf.similarity(" ".join(texts), " ".join(references.texts(r)))
        out.append(row)
    return out
