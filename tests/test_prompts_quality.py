"""Quality gates of description banks: each gate tripped exactly once by a hand-built bank."""

import pytest

from biomedap.prompts.quality import (
    MAX_CHARS,
    MAX_CLIP_TOKENS,
    MAX_JACCARD,
    MIN_CHARS,
    MIN_UNIQUE_CONTENT_WORDS,
    NEGATION_WINDOW,
    check_attributes,
    check_bank,
    clip_token_count,
    content_words,
    jaccard,
    name_variants,
    names_modality,
    names_sibling,
    words,
)

CLASSES = ["glioma", "meningioma"]
DATASET = "btmri"  # its modality words: MRI, MR, T1/T2, FLAIR, axial, coronal, sagittal, ...

G1 = "On axial MRI the glioma forms an infiltrative mass with an irregular enhancing rim and central necrosis."
G2 = "FLAIR sequences display diffuse hyperintense signal spreading along white matter tracts beyond the glioma."
G3 = "Perfusion MRI of a glioma reveals elevated cerebral blood volume inside the solid neoplastic component."
M1 = "On MRI the meningioma is a dural based extra-axial lesion with a broad attachment and a dural tail."
M2 = "Sagittal T1 images display homogeneous avid contrast uptake of the meningioma adjacent to the skull vault."


def good_bank():
    return {"glioma": [G1, G2, G3], "meningioma": [M1, M2]}


def check(bank, classnames=CLASSES, min_per_class=2):
    return check_bank(bank, classnames, DATASET, min_per_class=min_per_class)


def test_the_hand_built_bank_passes():
    report = check(good_bank())
    assert report.ok, report.summary()
    assert report.errors == [] and report.warnings == []
    assert report.counts == {"glioma": 3, "meningioma": 2}
    assert "btmri: OK" in report.summary()


def test_too_few_sentences():
    report = check(good_bank(), min_per_class=3)
    assert report.errors == ["'meningioma': 2 sentences, fewer than 3"]


def test_missing_class():
    bank = good_bank()
    del bank["meningioma"]
    report = check(bank)
    assert report.errors == ["classes without descriptions: ['meningioma']"]


def test_extra_class_is_a_warning_not_an_error():
    bank = {**good_bank(), "astrocytoma": [G1]}
    report = check(bank)
    assert report.ok
    assert report.warnings == ["bank entries that are not classes of btmri: ['astrocytoma']"]


def test_too_short():
    short = "MRI shows a glioma with broad edema."
    assert len(short) < MIN_CHARS
    bank = good_bank()
    bank["glioma"][1] = short
    report = check(bank)
    assert report.errors == [f"'glioma'[1]: {len(short)} characters (allowed {MIN_CHARS}-{MAX_CHARS})"]


def test_too_long():
    long = ("On coronal MRI the glioma extends from the frontal lobe across the genu of the corpus callosum into the "
            "opposite hemisphere, producing the classic butterfly pattern that surgeons regard as unresectable disease.")
    assert len(long) > MAX_CHARS and clip_token_count(long) <= MAX_CLIP_TOKENS  # trips the length gate only
    bank = good_bank()
    bank["glioma"][1] = long
    report = check(bank)
    assert report.errors == [f"'glioma'[1]: {len(long)} characters (allowed {MIN_CHARS}-{MAX_CHARS})"]


def test_more_than_77_clip_tokens():
    # CLIP's BPE splits digit runs into single digits: 114 characters, 90 tokens.
    dense = "MRI grading code for this glioma: " + "7" * 80
    tokens = clip_token_count(dense)
    assert MIN_CHARS <= len(dense) <= MAX_CHARS and tokens > MAX_CLIP_TOKENS
    bank = good_bank()
    bank["glioma"][2] = dense
    report = check(bank)
    assert report.errors == [f"'glioma'[2]: {tokens} CLIP tokens (max {MAX_CLIP_TOKENS})"]


def test_clip_token_count_includes_start_and_end_tokens():
    assert clip_token_count("") == 2
    assert clip_token_count("glioma") >= 3


def test_duplicate_ignores_case_and_punctuation():
    bank = good_bank()
    bank["glioma"][2] = G1.upper().replace(",", "").rstrip(".") + " !"
    report = check(bank)
    duplicates = [e for e in report.errors if "duplicate" in e]
    assert duplicates == ["'glioma'[2]: duplicate of [0]"]
    # The same words are also a Jaccard-1.0 pair; nothing else is reported.
    others = [e for e in report.errors if e not in duplicates]
    assert others == [f"'glioma'[0] and [2]: word overlap 1.00 ≥ {MAX_JACCARD}"]


def test_near_paraphrase_trips_the_jaccard_gate():
    # G1 with "mass" → "lesion" and "rim" → "margin".
    para = "On axial MRI the glioma forms an infiltrative lesion with an irregular enhancing margin and central necrosis."
    g1 = {"on", "axial", "mri", "the", "glioma", "forms", "an", "infiltrative", "mass", "with", "irregular",
          "enhancing", "rim", "and", "central", "necrosis"}
    pa = (g1 - {"mass", "rim"}) | {"lesion", "margin"}
    assert set(words(G1)) == g1 and set(words(para)) == pa
    expected = 14 / 18  # 14 shared words, 18 distinct words in the two sentences
    assert jaccard(G1, para) == pytest.approx(expected)
    bank = good_bank()
    bank["glioma"][1] = para
    report = check(bank)
    assert report.errors == [f"'glioma'[0] and [1]: word overlap {expected:.2f} ≥ {MAX_JACCARD}"]


def test_jaccard_threshold_is_inclusive():
    a = "MRI glioma: infiltrative, heterogeneous, necrotic enhancement, periventricular, oedematous."
    b = "MRI glioma: infiltrative, heterogeneous, necrotic enhancement, butterfly, callosal."
    c = "MRI glioma: infiltrative, heterogeneous, necrotic, cystic, butterfly, callosal."
    # shared: {mri glioma infiltrative heterogeneous necrotic enhancement}; 10 distinct words in all
    assert jaccard(a, b) == 6 / 10 == MAX_JACCARD
    assert jaccard(a, c) == 5 / 11  # one more word swapped
    tripped = check({"glioma": [a, b], "meningioma": [M1, M2]})
    assert tripped.errors == [f"'glioma'[0] and [1]: word overlap 0.60 ≥ {MAX_JACCARD}"]
    assert check({"glioma": [a, c], "meningioma": [M1, M2]}).ok


def test_missing_modality_word():
    plain = "The glioma infiltrates white matter tracts diffusely and crosses the corpus callosum in advanced cases."
    assert not names_modality(plain, DATASET) and names_modality(G1, DATASET)
    bank = good_bank()
    bank["glioma"][1] = plain
    report = check(bank)
    assert report.errors == [f"'glioma'[1]: does not name the modality or view: {plain!r}"]


def test_modality_words_match_whole_words_only():
    assert names_modality("T2-weighted images of the glioma", DATASET)
    assert not names_modality("a glioma seen in mrinal's notes", DATASET)
    assert names_modality("anything at all", "no-such-dataset")  # unknown dataset: no requirement


def test_sibling_named_without_negation():
    bank = good_bank()
    bank["glioma"][1] = "On MRI this glioma can mimic a meningioma when it reaches the dura near the convexity surface."
    report = check(bank)
    assert len(report.errors) == 1
    assert report.errors[0].startswith("'glioma'[1]: names sibling class 'meningioma' without negation")


def test_sibling_named_after_unlike_is_allowed():
    bank = good_bank()
    bank["glioma"][1] = "On MRI this glioma, unlike a meningioma, shows no dural tail and infiltrates adjacent white matter."
    assert check(bank).ok


def test_too_few_unique_content_words():
    # The meningioma sentences reuse the glioma vocabulary: few words are specific to the class.
    m1 = "On axial MRI the meningioma forms an infiltrative mass with an irregular enhancing rim."
    m2 = "Central necrosis surrounded by diffuse hyperintense signal marks this meningioma on sagittal MRI."
    bank = {"glioma": [G1, G2, G3], "meningioma": [m1, m2]}
    others = content_words(G1) | content_words(G2) | content_words(G3)
    unique = (content_words(m1) | content_words(m2)) - others
    assert unique == {"meningioma", "surrounded", "marks", "sagittal"}
    report = check(bank)
    assert report.errors == [f"'meningioma': only 4 content words no sibling uses ({sorted(unique)}); "
                             f"at least {MIN_UNIQUE_CONTENT_WORDS} needed"]


def test_content_words_skip_stopwords_short_words_and_numbers():
    found = content_words("The MRI shows a 3 cm glioma in the frontal lobe")
    assert found == {"mri", "glioma", "frontal", "lobe"}


# ------------------------------------------------------------------------------------ names_sibling


def test_name_variants_of_organ_sides():
    assert set(name_variants("kidney-left")) == {"kidney-left", "kidney left", "left kidney"}
    assert name_variants("Liver") == ["liver"]


@pytest.mark.parametrize("sentence", [
    "A bright kidney-left pole on this axial CT crop.",
    "The left kidney is seen beside the spine on CT.",
    "On CT the kidney left of the spine is bright.",
])
def test_names_sibling_finds_every_spelling_of_an_organ_side(sentence):
    assert names_sibling(sentence, "liver", "kidney-left")


def test_names_sibling_ignores_the_own_organ_and_negated_mentions():
    own, sibling = "kidney-right", "kidney-left"
    assert not names_sibling("The right kidney sits lower than the liver on coronal CT.", own, sibling)
    assert not names_sibling("Unlike the left kidney, the right kidney sits lower on coronal CT.", own, sibling)
    assert names_sibling("The right kidney sits lower than the left kidney on coronal CT.", own, sibling)
    assert not names_sibling("The kidney-leftover artefact is not a class name.", "liver", sibling)


def test_names_sibling_within_own_name_vs_sibling_containing_own_name():
    # "polyps" inside the own class "dyed lifted polyps" is not a mention of the sibling "polyps" ...
    assert not names_sibling("Dyed lifted polyps appear blue on endoscopy.", "dyed lifted polyps", "polyps")
    # ... but a sentence about "polyps" that names "dyed lifted polyps" does name that sibling.
    assert names_sibling("Polyps on endoscopy can resemble dyed lifted polyps.", "polyps", "dyed lifted polyps")
    assert not names_sibling("Polyps on endoscopy, unlike dyed lifted polyps, are not blue.", "polyps",
                             "dyed lifted polyps")


def test_negation_inside_the_own_name_does_not_count():
    own, sibling = "no diabetic retinopathy", "mild diabetic retinopathy"
    assert names_sibling("A fundus of no diabetic retinopathy may look like mild diabetic retinopathy.", own, sibling)


def test_negation_cue_must_be_close_to_the_sibling():
    near = "No " + "word " * NEGATION_WINDOW + "meningioma on MRI."
    far = "No " + "word " * (NEGATION_WINDOW + 1) + "meningioma on MRI."
    assert not names_sibling(near, "glioma", "meningioma")
    assert names_sibling(far, "glioma", "meningioma")


# ------------------------------------------------------------------------------------ attributes


def _attributes(**overrides):
    table = {
        "glioma": [f"glioma trait number {i}" for i in range(10)],
        "meningioma": [f"meningioma trait number {i}" for i in range(10)],
    }
    table.update(overrides)
    return {"frame": {"prefix": "an MRI of", "suffix": ""}, "attributes": table}


def test_check_attributes_gates():
    assert check_attributes(_attributes(), CLASSES, DATASET).ok
    report = check_attributes(_attributes(glioma=["has a rim"] * 2), CLASSES, DATASET)
    assert report.errors == ["'glioma': 2 attributes, expected 10", "'glioma': duplicate attributes"]
    bad = [f"trait {i}" for i in range(9)] + ["looks like a meningioma"]
    assert check_attributes(_attributes(glioma=bad), CLASSES, DATASET).errors == [
        "'glioma': attribute names sibling class 'meningioma': 'looks like a meningioma'"]
    no_frame = {"attributes": _attributes()["attributes"]}
    errors = check_attributes(no_frame, CLASSES, DATASET).errors
    assert errors == ["missing frame {'prefix': str, 'suffix': str}"]
    missing = _attributes()
    del missing["attributes"]["meningioma"]
    assert check_attributes(missing, CLASSES, DATASET).errors == ["'meningioma': no attributes"]
