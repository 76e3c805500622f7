"""Quality gates for description banks and attribute lists.

A bank is ``{classname: [sentence, ...]}`` for one dataset.  Every built-in bank must pass
:func:`check_bank`; user banks are checked with the same function (``biomedap prompts check``),
where failures are reported rather than fatal.  The gates:

* every class of the dataset has at least ``min_per_class`` sentences (50 for built-in banks);
* each sentence is 60–200 characters and at most 77 CLIP BPE tokens including start/end tokens
  (so CLIP-style backbones, not only BERT's 256-token context, take it whole);
* no duplicates within a class, and no two sentences of a class whose word sets overlap with
  Jaccard ≥ 0.6 (varied wording, not one sentence with synonyms swapped);
* every sentence names the imaging modality or view (dataset-specific terms, below);
* no sentence names a sibling class of the same dataset unless just after a negation cue ("unlike", "no", ...);
* at least 8 content words per class that no sibling class uses (the text says what is specific).

Run on a file while writing one::

    python -m biomedap.prompts.quality path/to/bank.json DATASET_ID
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from ..data.catalog import list_all_datasets

MIN_CHARS, MAX_CHARS = 60, 200
MAX_CLIP_TOKENS = 77
MAX_JACCARD = 0.6
MIN_UNIQUE_CONTENT_WORDS = 8
ATTRIBUTES_PER_CLASS = 10
MAX_ATTRIBUTE_CHARS = 80

# Words that name the imaging modality or view, per dataset id (regular expressions, matched
# case-insensitively on word boundaries).  A sentence must contain at least one.  The patterns are
# part of each dataset's catalog row (DatasetSpec.modality_terms); this is a read-only view by id.
MODALITY_TERMS: Mapping[str, str] = MappingProxyType(
    {spec.key: spec.modality_terms for spec in list_all_datasets() if spec.modality_terms}
)

# A sibling class may be named only shortly after one of these (e.g. "unlike a meningioma tumor").
NEGATION_WINDOW = 8  # words allowed between the cue and the sibling's name
NEGATION_CUES = (
    "no", "not", "without", "unlike", "rather than", "instead of", "absence of", "absent", "lacks", "lacking",
    "nor", "as opposed to", "distinct from", "differs from", "different from", "never", "none",
)

STOPWORDS = frozenset("""
a an the of in on at to and or with without by for from as is are was were be been being this that these those
it its into onto over under within between through than then there their which who whom whose what when where
while also often usually typically may might can could shows show showing seen appears appear appearing image
images scan scans view views photo photograph picture visible present presents presenting along across around
near more most less least very such some any each other both either few many much one two three per
""".split())


def _dataset_key(dataset: str) -> str:
    """The catalog key of ``dataset`` (a key, name or resource id), or ``dataset`` itself if unknown."""
    from ..data.catalog import get_dataset_spec
    from ..data.errors import UnknownDatasetError

    try:
        return get_dataset_spec(dataset).key if dataset else dataset
    except UnknownDatasetError:
        return dataset


@dataclass
class BankReport:
    """Problems found in a bank; empty ``errors`` means it passes."""

    dataset: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.dataset}: {'OK' if self.ok else f'{len(self.errors)} problem(s)'}"
        counts = ", ".join(f"{name}: {n}" for name, n in self.counts.items())
        lines = [head, f"  sentences per class: {counts}"] if counts else [head]
        lines += [f"  error: {e}" for e in self.errors[:50]]
        if len(self.errors) > 50:
            lines.append(f"  … and {len(self.errors) - 50} more")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    """CLIP BPE tokens of ``text`` including the start and end tokens."""
    return len(_clip_tokenizer().encode(text)) + 2


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


def jaccard(a: str, b: str) -> float:
    sa, sb = set(words(a)), set(words(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) >= 3 and w not in STOPWORDS and not w.isdigit()}


def name_variants(classname: str) -> list[str]:
    """How a class name may appear in running text: as is, hyphens as spaces, "organ-side" as "side organ"."""
    name = classname.lower()
    variants = {name, name.replace("-", " ")}
    match = re.fullmatch(r"([a-z ]+)-(left|right)", name)
    if match:
        variants.add(f"{match.group(2)} {match.group(1)}")
    return sorted(variants, key=len, reverse=True)


def names_sibling(sentence: str, own: str, sibling: str) -> bool:
    """Whether ``sentence`` names ``sibling`` without a negation cue shortly before it.

    The cue must end at most :data:`NEGATION_WINDOW` words before the mention ("unlike the red
    linear defects of reflux esophagitis" is negated; "No calcification is seen in this large
    well-circumscribed extra-axial mass, a meningioma tumor" is not).
    """
    text = sentence.lower()
    # The own name may contain a sibling's ("polyps" in "dyed lifted polyps"): a sibling mention
    # inside an own mention does not count. The reverse must still count ("dyed lifted polyps"
    # named in a sentence about "polyps"), so own mentions are masked only for the cue search
    # (an own name may hold a cue word: "no diabetic retinopathy").
    own_spans = _mentions(text, own)
    masked = text
    for start, end in own_spans:
        masked = masked[:start] + " " * (end - start) + masked[end:]
    for start, end in _mentions(text, sibling):
        if any(s <= start and end <= e and e - s > end - start for s, e in own_spans):
            continue
        before = masked[:start]
        if not any(len(words(before[cue.end():])) <= NEGATION_WINDOW
                   for cue_text in NEGATION_CUES
                   for cue in re.finditer(rf"(?<![a-z]){re.escape(cue_text)}(?![a-z])", before)):
            return True
    return False


def _mentions(text: str, name: str) -> list[tuple[int, int]]:
    """Spans of ``text`` (lowercase) where a variant of ``name`` stands as whole words."""
    return [(match.start(), match.end()) for variant in name_variants(name)
            for match in re.finditer(rf"(?<![a-z0-9-]){re.escape(variant)}(?![a-z0-9-])", text)]


def names_modality(sentence: str, dataset: str) -> bool:
    """Whether ``sentence`` names the modality of ``dataset`` (key, name or resource id; unknown → True)."""
    pattern = MODALITY_TERMS.get(_dataset_key(dataset))
    if pattern is None:
        return True
    return re.search(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])", sentence.lower()) is not None


def check_bank(
    bank: Mapping[str, Sequence[str]],
    classnames: Sequence[str],
    dataset: str,
    *,
    min_per_class: int = 50,
) -> BankReport:
    """Check a bank against a dataset's classes and every gate in the module docstring."""
    report = BankReport(dataset)
    missing = [name for name in classnames if name not in bank]
    extra = [name for name in bank if name not in classnames]
    if missing:
        report.errors.append(f"classes without descriptions: {missing}")
    if extra:
        report.warnings.append(f"bank entries that are not classes of {dataset}: {extra}")
    vocab = {name: set().union(*(content_words(s) for s in bank.get(name, []) if isinstance(s, str)))
             for name in classnames}
    for name in classnames:
        sentences = list(bank.get(name, []))
        report.counts[name] = len(sentences)
        if name in bank and len(sentences) < min_per_class:
            report.errors.append(f"{name!r}: {len(sentences)} sentences, fewer than {min_per_class}")
        seen: dict[str, int] = {}
        for i, sentence in enumerate(sentences):
            where = f"{name!r}[{i}]"
            if not isinstance(sentence, str):
                report.errors.append(f"{where}: not a string")
                continue
            key = " ".join(words(sentence))
            if key in seen:
                report.errors.append(f"{where}: duplicate of [{seen[key]}]")
            seen.setdefault(key, i)
            if not MIN_CHARS <= len(sentence) <= MAX_CHARS:
                report.errors.append(f"{where}: {len(sentence)} characters (allowed {MIN_CHARS}-{MAX_CHARS})")
            tokens = clip_token_count(sentence)
            if tokens > MAX_CLIP_TOKENS:
                report.errors.append(f"{where}: {tokens} CLIP tokens (max {MAX_CLIP_TOKENS})")
            if not names_modality(sentence, dataset):
                report.errors.append(f"{where}: does not name the modality or view: {sentence!r}")
            for sibling in classnames:
                if sibling != name and names_sibling(sentence, name, sibling):
                    report.errors.append(f"{where}: names sibling class {sibling!r} without negation: {sentence!r}")
        # Word sets once per sentence: the pairwise loop is quadratic (1,225 pairs for 50 sentences).
        word_sets = [set(words(s)) if isinstance(s, str) else set() for s in sentences]
        for i in range(len(sentences)):
            for j in range(i + 1, len(sentences)):
                union = word_sets[i] | word_sets[j]
                score = len(word_sets[i] & word_sets[j]) / len(union) if union else 1.0
                if score >= MAX_JACCARD:
                    report.errors.append(f"{name!r}[{i}] and [{j}]: word overlap {score:.2f} ≥ {MAX_JACCARD}")
        others = set().union(*(vocab[s] for s in classnames if s != name)) if len(classnames) > 1 else set()
        unique = vocab[name] - others
        if name in bank and len(unique) < MIN_UNIQUE_CONTENT_WORDS:
            report.errors.append(f"{name!r}: only {len(unique)} content words no sibling uses "
                                 f"({sorted(unique)}); at least {MIN_UNIQUE_CONTENT_WORDS} needed")
    return report


def check_attributes(attributes: Mapping, classnames: Sequence[str], dataset: str) -> BankReport:
    """Check an attribute file: ``{"frame": {"prefix", "suffix"}, "attributes": {class: [10 phrases]}}``."""
    report = BankReport(dataset)
    frame = attributes.get("frame") if isinstance(attributes, Mapping) else None
    if not isinstance(frame, Mapping) or not isinstance(frame.get("prefix"), str) or "suffix" not in frame:
        report.errors.append("missing frame {'prefix': str, 'suffix': str}")
    table = attributes.get("attributes", {}) if isinstance(attributes, Mapping) else {}
    for name in classnames:
        phrases = table.get(name)
        if not phrases:
            report.errors.append(f"{name!r}: no attributes")
            continue
        report.counts[name] = len(phrases)
        if len(phrases) != ATTRIBUTES_PER_CLASS:
            report.errors.append(f"{name!r}: {len(phrases)} attributes, expected {ATTRIBUTES_PER_CLASS}")
        if len({p.lower() for p in phrases}) != len(phrases):
            report.errors.append(f"{name!r}: duplicate attributes")
        for phrase in phrases:
            if not 3 <= len(phrase) <= MAX_ATTRIBUTE_CHARS:
                report.errors.append(f"{name!r}: attribute of {len(phrase)} characters: {phrase!r}")
            for sibling in classnames:
                if sibling != name and names_sibling(phrase, name, sibling):
                    report.errors.append(f"{name!r}: attribute names sibling class {sibling!r}: {phrase!r}")
    extra = [name for name in table if name not in classnames]
    if extra:
        report.warnings.append(f"attribute entries that are not classes of {dataset}: {extra}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m biomedap.prompts.quality BANK.json DATASET_ID [CLASSNAME ...]`` — for bank authors."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(main.__doc__)
        return 2
    path, dataset, classnames = args[0], args[1], args[2:]
    data = json.loads(open(path, encoding="utf-8").read())
    if not classnames:
        classnames = list(data.get("attributes", data))
    if "attributes" in data and "frame" in data:
        report = check_attributes(data, classnames, dataset)
    else:
        report = check_bank(data, classnames, dataset)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
