"""Text metrics computed offline, the way the field computes them.

- SQuAD exact match and F1 with the official answer normalisation (lower case, no punctuation, no articles
  a/an/the, single spaces), maximised over the gold answers; an unanswerable question's gold is the empty string.
  Reported on the official script's 0-100 scale.
- ROUGE-1/2/L/Lsum from Google's `rouge-score` with the Porter stemmer, F-measure averaged over examples (0-1);
  ROUGE-Lsum splits both texts into sentences on newlines, as that package expects.
- sacreBLEU corpus BLEU and chrF (0-100), METEOR from NLTK (0-1) when a WordNet database is on the machine.

`evaluate.load` would fetch these scripts from the hub at run time and fails offline; the libraries it wraps are
called directly instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import string
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")


# metrics that count examples (free generations that matched no label): shown as whole numbers, not 40.0000
COUNT_METRICS = frozenset({"invalid"})


def higher_is_better(metric: str) -> bool:
    """The direction of a metric, for choosing the best checkpoint, the best search trial and the best method."""
    return metric not in LOWER_IS_BETTER


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---- SQuAD -------------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised texts; two empty answers agree (SQuAD v2's no-answer case)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]], breakdown: bool = False) -> dict[str, Any]:
    """exact_match and f1 (0-100, best over each question's gold answers), with the SQuAD v2 HasAns/NoAns split
    when some questions have no answer (empty gold list) or `breakdown` asks for it."""
    em = [max(exact_match(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds, strict=True)]
    f1 = [max(token_f1(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds, strict=True)]
    n = max(len(em), 1)
    out: dict[str, Any] = {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}
    has = [i for i, gs in enumerate(golds) if gs]
    if breakdown or len(has) < len(golds):
        no = [i for i, gs in enumerate(golds) if not gs]
        for name, idx in (("HasAns", has), ("NoAns", no)):
            out[f"{name}_exact"] = 100 * sum(em[i] for i in idx) / len(idx) if idx else 0.0
            out[f"{name}_f1"] = 100 * sum(f1[i] for i in idx) / len(idx) if idx else 0.0
            out[f"{name}_total"] = len(idx)
    return out


# ---- ROUGE ---------------------------------------------------------------------------------------------------------
def sentence_lines(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum: kept as is when the text already has line breaks (CNN/DailyMail
    highlights), else split after sentence-final punctuation (NLTK's punkt model is not available offline)."""
    text = text.strip()
    if "\n" in text:
        return "\n".join(line.strip() for line in text.splitlines() if line.strip())
    return "\n".join(_SENTENCE_END.split(text))


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer  # deferred: a heavy import (seconds), paid only by the runs that use it

    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(sentence_lines(reference), sentence_lines(prediction))
        for key in keys:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: total / n for key, total in totals.items()}


# ---- translation -------------------------------------------------------------------------------------------------
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/WordNet", "/usr/local/share/wordnet")
# WordNet 3.0's lexicographer files (lexnames(5WN)), in file-number order. NLTK's reader wants them in a `lexnames`
# file, which Debian's wordnet-base package does not ship; it only documents them in its man page.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_SYNTACTIC_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def _reader_root(folder: Path) -> Path:
    """`folder` itself when it has a `lexnames` file, else a cached copy of its database plus that file."""
    if (folder / "lexnames").is_file():
        return folder

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = cache / "ftctl" / f"wordnet-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}"
    if not (root / "lexnames").is_file():
        root.mkdir(parents=True, exist_ok=True)

        # copies, not links: NLTK refuses symbolic and hard links as possible escapes from its data root
        for file in folder.iterdir():
            if file.is_file() and file.name.startswith(("data.", "index.")) or file.suffix == ".exc":
                shutil.copyfile(file, root / file.name)
        lines = [f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
        (root / "lexnames.tmp").write_text("\n".join(lines) + "\n")
        (root / "lexnames.tmp").replace(root / "lexnames")
    return root


@lru_cache(maxsize=1)
def wordnet() -> Any:
    """A WordNet reader, or None: NLTK's own data first, else the database of Debian's `wordnet-base` package."""
    try:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from nltk.corpus import wordnet as nltk_wordnet

        nltk_wordnet.ensure_loaded()
        return nltk_wordnet
    except LookupError:
        pass
    # deferred: a heavy import (seconds), paid only by the runs that use it
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            return None  # no mapping to NLTK's own WordNet copy (only multilingual lookups need it, METEOR does not)

    for folder in map(Path, WORDNET_DIRS):
        if (folder / "data.noun").is_file() and (folder / "index.noun").is_file():
            import nltk  # deferred: a heavy import (seconds), paid only by the runs that use it

            root = _reader_root(folder)
            # NLTK reads corpora only under its data path: allow the database and our `lexnames` beside it
            nltk.data.path.extend(str(p) for p in (root, folder) if str(p) not in nltk.data.path)
            try:
                with warnings.catch_warnings():  # "multilingual functions are not available": not used here
                    warnings.simplefilter("ignore")
                    return LocalWordNet(str(root), None)
            except (OSError, ValueError):
                continue
    return None


METEOR_NOTE = (
    "METEOR not computed: no WordNet database found (NLTK data, or Debian's wordnet-base package: "
    "apt-get install wordnet-base)"
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def translation_scores(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[str]]:
    """(corpus BLEU, chrF and, with WordNet, mean sentence METEOR; notes on what could not be computed)."""
    import sacrebleu  # deferred: a heavy import (seconds), paid only by the runs that use it

    scores = {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
    reader = wordnet()
    if reader is None:
        return scores, [METEOR_NOTE]
    # deferred: a heavy import (seconds), paid only by the runs that use it
    from nltk.translate.meteor_score import meteor_score

    values = [
        meteor_score([_words(r)], _words(p), wordnet=reader) for p, r in zip(predictions, references, strict=True)
    ]
    scores["meteor"] = sum(values) / max(len(values), 1)
    return scores, []
