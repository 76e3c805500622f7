"""Seeded, calibrated text perturbations: guarantees, calibration and per-kind behaviour."""

import math
from collections import Counter
from functools import lru_cache

import pytest

from biomedap.prompts import perturb
from biomedap.prompts.banks import load_bank
from biomedap.prompts.perturb import (
    NOISE_KINDS,
    changed_fraction,
    perturb_bank,
    perturb_template,
    perturb_text,
    word_tokens,
)
from biomedap.prompts.templates import format_template

LONG = ("On axial T2-weighted MRI the glioma appears as a heterogeneous hyperintense mass with irregular margins, "
        "surrounding vasogenic edema, mass effect on the lateral ventricle and a necrotic center that does not enhance.")
# Every word distinct, so the changed positions can be read off the output.
DISTINCT = ("On axial T2-weighted MRI the glioma appears as a heterogeneous hyperintense mass with irregular margins "
            "and surrounding vasogenic edema")
SINGLE_WORD_KINDS = ("typo", "drop", "truncate")


@lru_cache(maxsize=1)
def _small_bank():
    """The first 10 sentences of each BTMRI class (40 sentences, about 900 words)."""
    return {name: sentences[:10] for name, sentences in load_bank("btmri").items()}


def _osa_distance(a: str, b: str) -> int:
    """Edit distance with insertions, deletions, substitutions and adjacent transpositions."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _is_subsequence(short, long):
    it = iter(long)
    return all(token in it for token in short)


def test_osa_distance_helper():
    assert _osa_distance("lesion", "lesion") == 0
    assert _osa_distance("lesion", "lesoin") == 1  # adjacent swap
    assert _osa_distance("lesion", "lesin") == 1
    assert _osa_distance("lesion", "lwsion") == 1
    assert _osa_distance("lesion", "lesiion") == 1
    assert _osa_distance("lesion", "elsoin") == 2


# ------------------------------------------------------------------------------------ guarantees


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_level_zero_is_the_identity(kind):
    assert perturb_text(LONG, 0, 7, kind) == LONG
    assert perturb_template("clinical/btmri", 0.0, 7, kind) == "a MR photo of a {} in the brain."
    bank = _small_bank()
    assert perturb_bank(bank, 0, 7, kind) == bank


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_seeded_and_reproducible(kind):
    first = perturb_text(LONG, 0.3, 11, kind)
    assert first != LONG
    assert perturb_text(LONG, 0.3, 11, kind) == first
    assert perturb_text(LONG, 0.3, "run-a", kind) == perturb_text(LONG, 0.3, "run-a", kind)
    outputs = {perturb_text(LONG, 0.3, seed, kind) for seed in range(10)}
    assert len(outputs) >= 2
    if kind != "truncate":  # truncate always cuts the tail: only the rounding of 0.3·n depends on the seed
        assert perturb_text(LONG, 0.3, 0, kind) != perturb_text(LONG, 0.3, 1, kind)


def test_truncate_depends_on_the_seed_only_through_rounding():
    assert len(word_tokens(LONG)) == 32
    assert len({perturb_text(LONG, 0.25, seed, "truncate") for seed in range(10)}) == 1  # 0.25·32 = 8 exactly


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("template", ["clinical/btmri", "a photo of a {}."])
def test_the_placeholder_survives(kind, template):
    for level in (0.3, 0.7, 1.0):
        for seed in range(4):
            result = perturb_template(template, level, seed, kind)
            assert result.count("{}") == 1, result
            assert "glioma" in format_template(result, "glioma")  # still a usable template


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_calibrated_on_a_builtin_bank(kind):
    bank = _small_bank()
    measured = {level: changed_fraction(bank, perturb_bank(bank, level, 0, kind))
                for level in (0.1, 0.2, 0.3, 0.5, 0.6)}
    for level in (0.1, 0.3, 0.5):
        assert abs(measured[level] - level) <= 0.05, (level, measured[level])
    assert measured[0.6] > measured[0.2]


@pytest.mark.parametrize("kind", ["typo", "drop", "lay", "modality", "truncate", "mix"])
def test_each_sentence_changes_exactly_its_rounded_budget(kind):
    # k = ℓ·n stochastically rounded, and exactly k words lose their alignment. The retina bank has
    # "the fundus": a lay phrase such as "back of the eye" must not realign with a replaced "the".
    retina = {name: sentences[:10] for name, sentences in load_bank("retina").items()}
    for name, sentences in retina.items():
        for i, sentence in enumerate(sentences):
            n = len(word_tokens(sentence))
            changed = round(changed_fraction(sentence, perturb_text(sentence, 0.5, i, kind)) * n)
            assert math.floor(0.5 * n) <= changed <= math.ceil(0.5 * n), (name, i)


@pytest.mark.parametrize("kind", SINGLE_WORD_KINDS)
def test_selection_at_a_higher_level_contains_the_lower_one(kind):
    original = word_tokens(DISTINCT)
    assert len(set(original)) == len(original)
    for seed in range(5):
        changed = []
        for level in (0.2, 0.4, 0.7):
            tokens = word_tokens(perturb_text(DISTINCT, level, seed, kind))
            if kind == "typo":
                assert len(tokens) == len(original)
                changed.append({i for i, (a, b) in enumerate(zip(original, tokens)) if a != b})
            else:
                changed.append({i for i, word in enumerate(original) if word not in tokens})
        assert changed[0] <= changed[1] <= changed[2], (seed, changed)
        assert changed[0] < changed[2]


# ------------------------------------------------------------------------------------ per kind


def test_typo_words_are_one_edit_away():
    original = word_tokens(LONG)
    for seed in range(5):
        tokens = word_tokens(perturb_text(LONG, 0.5, seed, "typo"))
        assert len(tokens) == len(original)
        distances = [_osa_distance(a, b) for a, b in zip(original, tokens)]
        assert set(distances) == {0, 1}
        assert abs(distances.count(1) - 0.5 * len(original)) <= 1  # k = 0.5·n, stochastically rounded


def test_drop_removes_words_only():
    original = word_tokens(LONG)
    for seed in range(5):
        tokens = word_tokens(perturb_text(LONG, 0.4, seed, "drop"))
        assert len(tokens) < len(original)
        assert _is_subsequence(tokens, original)
        assert abs(len(original) - len(tokens) - 0.4 * len(original)) <= 1


def test_shuffle_keeps_the_multiset_of_words():
    original = word_tokens(LONG)
    for seed in range(8):  # both the single-word and the clause moves
        tokens = word_tokens(perturb_text(LONG, 0.3, seed, "shuffle"))
        assert Counter(tokens) == Counter(original)
        assert tokens != original


def test_lay_replaces_clinical_terms_with_lay_words():
    for seed in range(5):
        result = perturb_text("MRI: hyperintense lesion, on T2.", 0.4, seed, "lay")  # 5 words, 2 changed
        tokens = word_tokens(result)
        assert "hyperintense" not in tokens and "lesion" not in tokens
        assert set(perturb._LAY["hyperintense"]) & set(tokens)
        assert set(perturb._LAY["lesion"]) & set(tokens)
        assert tokens[0] == "mri" and tokens[-2:] == ["on", "t2"]
    plural = word_tokens(perturb_text("Lesions on this scan.", 0.25, 0, "lay"))
    assert plural[0] in {"spots", "sores", "patches"}


def test_opacity_becomes_a_multiword_lay_phrase():
    result = perturb_text("Opacity in the lung.", 0.25, 0, "lay")
    assert result.split(" in the lung")[0].lower() in {"cloudy patch", "haze"}


def test_modality_swaps_terms_for_another_modality():
    other_terms = {token for group, roles in perturb._MODALITY.items() if group != "mri"
                   for terms in roles.values() for term in terms for token in word_tokens(term)}
    for seed in range(5):
        result = perturb_text("T2-weighted MRI of the brain.", 0.4, seed, "modality")  # 5 words, 2 changed
        tokens = word_tokens(result)
        assert "mri" not in tokens and "t2-weighted" not in tokens
        assert tokens[-3:] == ["of", "the", "brain"]
        assert tokens[:-3] and set(tokens[:-3]) <= other_terms


def test_truncate_keeps_a_prefix():
    original = word_tokens(LONG)
    for level in (0.1, 0.5, 0.9):
        tokens = word_tokens(perturb_text(LONG, level, 3, "truncate"))
        assert tokens == original[:len(tokens)] and len(tokens) < len(original)


def test_truncate_cuts_a_template_tail_then_head():
    template = "a MR photo of a {} in the brain."  # 8 words: 5 before "{}", 3 after
    assert perturb_template(template, 3 / 8, 0, "truncate") == "a MR photo of a {}"
    assert perturb_template(template, 4 / 8, 0, "truncate") == "MR photo of a {}"


def test_mix_inserts_words_from_the_pool():
    pool = ["zebra giraffe penguin walrus ocelot narwhal", "okapi tapir lemur"]
    pool_words = {w for text in pool for w in word_tokens(text)}
    original = word_tokens(LONG)
    for seed in range(5):
        tokens = word_tokens(perturb_text(LONG, 0.25, seed, "mix", pool=pool))
        # original prefix + pool fragment + original suffix
        head = next(i for i, (a, b) in enumerate(zip(original + [None], tokens + [None])) if a != b)
        tail = next(i for i, (a, b) in enumerate(zip(original[::-1] + [None], tokens[::-1] + [None]))
                    if a != b)
        middle = tokens[head:len(tokens) - tail]
        assert middle and set(middle) <= pool_words
        assert len(original) - head - tail == 8  # 0.25 · 32 words replaced, as one run


def test_mix_without_a_pool_uses_unrelated_report_text():
    unrelated = {w for text in perturb._UNRELATED for w in word_tokens(text)}
    new = set(word_tokens(perturb_text(LONG, 0.3, 1, "mix"))) - set(word_tokens(LONG))
    assert new and new <= unrelated


def test_perturb_bank_keeps_classes_and_counts():
    bank = _small_bank()
    noisy = perturb_bank(bank, 0.3, 5)
    assert list(noisy) == list(bank)
    assert all(len(noisy[name]) == len(bank[name]) for name in bank)
    assert noisy != bank
    # Each sentence has its own generator: the result does not depend on the rest of the bank.
    name = next(iter(bank))
    alone = perturb_bank({name: bank[name][:1]}, 0.3, 5, "typo")
    assert alone[name][0] == perturb_bank(bank, 0.3, 5, "typo")[name][0]
    assert alone[name][0] == perturb_text(bank[name][0], 0.3, f"5|{name}|0", "typo")


@pytest.mark.parametrize("level", [-0.1, 1.5, math.nan, True, "0.3", None])
def test_invalid_levels_are_rejected(level):
    for call in (lambda: perturb_text(LONG, level, 0),
                 lambda: perturb_template("generic", level, 0),
                 lambda: perturb_bank({"a": [LONG]}, level, 0)):
        with pytest.raises(ValueError, match="level must be a number in \\[0, 1\\]"):
            call()


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind 'typos' is not a noise kind; use one of typo, drop"):
        perturb_text(LONG, 0.3, 0, "typos")
    with pytest.raises(ValueError, match="kind 'noise'"):
        perturb_bank({"a": [LONG]}, 0.3, 0, "noise")


# ------------------------------------------------------------------------------------ measuring


def test_changed_fraction_by_hand():
    assert changed_fraction("a b c d", "a c d") == 0.25
    assert changed_fraction("a b c d", "A, b. C d!") == 0.0  # lowercase word tokens
    assert changed_fraction("a b c d", "") == 1.0
    assert changed_fraction("", "anything") == 0.0
    # An optimal alignment: "p r t" still aligns (difflib's greedy matcher would keep only 2 words).
    assert changed_fraction("p q r s t", "p s r t q") == pytest.approx(0.4)


def test_changed_fraction_is_token_weighted_over_lists_and_banks():
    assert changed_fraction(["a b", "c d e f"], ["a b", "c"]) == 0.5
    bank = {"x": ["a b"], "y": ["c d e f"]}
    assert changed_fraction(bank, {"x": ["a"], "y": ["c d e f"]}) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="same classes"):
        changed_fraction({"x": ["a"]}, {"y": ["a"]})
    with pytest.raises(ValueError, match="same length"):
        changed_fraction(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        changed_fraction("a", ["a"])
