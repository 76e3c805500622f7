"""Seeded, calibrated degradation of clinical text: templates, sentences, whole description banks.

Prompt-robustness experiments need text that is wrong in the ways real clinical text is wrong.
:func:`perturb_text` damages a string at a noise level ``ℓ ∈ [0, 1]`` with one of these kinds:

========== ==================================================================================
kind       what happens to the chosen word tokens
========== ==================================================================================
typo       a character edit: adjacent swap, deletion, keyboard-neighbour substitution,
           insertion or doubling ("lesion" → "lesoin", "lesin", "lwsion", "lesiion")
drop       the word is left out
shuffle    the word moves elsewhere in the sentence; or, when the sentence allows it, a whole
           run of words (a clause) moves past at least as many words as it holds
lay        clinical terms become lay terms ("hyperintense" → "bright", "carcinoma" → "cancer",
           "opacity" → "cloudy patch"); when a sentence has too few clinical terms, ordinary
           words become casual ones ("demonstrates" → "shows") or filler ("kind of")
modality   modality words are swapped for another modality's ("T2-weighted" → "Doppler",
           "hypointense" → "hypoechoic", "MRI" → "CT"); other words, when needed, become
           descriptors of another modality
truncate   the sentence is cut short (a template loses its tail after ``{}``, then its head)
mix        a run of words is replaced by a fragment of another class's description (or of
           unrelated report text), i.e. irrelevant text mixed in
mixed      each edit draws one of the kinds above at random (the default)
========== ==================================================================================

Calibration. ``ℓ`` is the expected fraction of word tokens changed. For a text with ``n`` word
tokens, ``k`` = ``ℓ·n`` stochastically rounded (``⌊ℓn⌋``, plus one with probability ``ℓn − ⌊ℓn⌋``)
tokens are changed, every token equally likely (clinical / modality terms first for "lay" and
"modality"). Each kind is built so that exactly those ``k`` original tokens lose their alignment:
replacements never equal the words they replace (lay ones share no word with the sentence);
moved words are reinserted in reversed order at other positions, so no two of them can realign;
a moved clause crosses at least its own length. :func:`changed_fraction` measures the result
independently — ``1 − matched / n`` over lowercase word tokens, ``matched`` being the length of
their longest common subsequence (an optimal alignment), token-weighted over a bank — and lands
within about ±0.01 of ``ℓ`` on the built-in banks for ``ℓ ≤ 0.6``, for every kind. Above that
"shuffle" (and so "mixed") can fall short — by about 0.05 at 0.8 and up to 0.18 at 1 — because
once most words move, repeated ones ("a", "the", "of") realign by chance.

Guarantees: ``ℓ = 0`` returns the input unchanged; the same seed gives the same output; the
selection at a higher ``ℓ`` contains the selection at a lower one (same seed, single-word kinds);
a template's ``{}`` placeholder is never touched (it is not a word token). Randomness comes from
a private :class:`random.Random` per text — no global state.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Union

__all__ = [
    "NOISE_KINDS",
    "changed_fraction",
    "perturb_bank",
    "perturb_template",
    "perturb_text",
    "word_tokens",
]

NOISE_KINDS: tuple[str, ...] = ("typo", "drop", "shuffle", "lay", "modality", "truncate", "mix", "mixed")
_EDIT_KINDS: tuple[str, ...] = NOISE_KINDS[:-1]

# Word tokens as the quality gates count them: letters and digits, with inner hyphens and
# apostrophes ("x-ray", "crohn's"). "{}" is not a word, so placeholders are never edited.
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", re.IGNORECASE)

Seed = Union[int, str]

# ------------------------------------------------------------------------------------ dictionaries

# Clinical term → lay alternatives. Keys are lowercase word sequences; plural forms of one-word
# keys are derived (lesions → spots). No alternative shares a word with its key.
_LAY: Mapping[str, tuple[str, ...]] = {
    # findings, general pathology
    "lesion": ("spot", "sore", "patch"), "carcinoma": ("cancer",), "adenocarcinoma": ("gland cancer", "cancer"),
    "neoplasm": ("growth",), "neoplastic": ("cancerous",), "tumor": ("lump", "growth"), "tumour": ("lump", "growth"),
    "mass": ("lump",), "malignant": ("cancerous", "bad"), "malignancy": ("cancer",), "benign": ("harmless", "not cancer"),
    "metastasis": ("spread",), "metastatic": ("spreading",), "edema": ("swelling",), "oedema": ("swelling",),
    "effusion": ("fluid buildup",), "hemorrhage": ("bleeding",), "haemorrhage": ("bleeding",),
    "hemorrhagic": ("bloody",), "necrosis": ("dead tissue",), "necrotic": ("dead",), "calcification": ("calcium spot",),
    "calcified": ("chalky",), "cyst": ("fluid sac", "blister"), "cystic": ("fluid-filled",), "nodule": ("small lump",),
    "nodular": ("lumpy",), "inflammation": ("swelling", "irritation"), "inflammatory": ("irritated",),
    "inflamed": ("irritated", "sore"), "erythema": ("redness",), "erythematous": ("reddish",), "ulcer": ("sore",),
    "ulceration": ("open sore",), "ulcerated": ("raw",), "fibrosis": ("scarring",), "fibrotic": ("scarred",),
    "sclerosis": ("hardening",), "sclerotic": ("hardened",), "stenosis": ("narrowing",), "atrophy": ("shrinking",),
    "atrophic": ("shrunken",), "hypertrophy": ("overgrowth",), "hyperplasia": ("overgrowth",),
    "dysplasia": ("abnormal growth",), "dysplastic": ("abnormal",), "abnormality": ("problem",),
    "pathology": ("disease",), "pathological": ("diseased",), "lesional": ("spotty",), "infiltrate": ("invading cells",),
    "infiltration": ("invasion",), "infiltrative": ("invading",), "infection": ("germs",), "infectious": ("catching",),
    "bacterial": ("germ",), "viral": ("virus",), "acute": ("sudden",), "chronic": ("long-lasting",),
    "degenerative": ("wear-and-tear",), "idiopathic": ("unexplained",), "asymptomatic": ("silent",),
    "diagnosis": ("finding",), "prognosis": ("outlook",), "etiology": ("cause",), "morphology": ("shape",),
    "contour": ("outline",), "margin": ("edge",), "margins": ("edges",), "circumscribed": ("well-defined", "sharp"),
    "spiculated": ("spiky",), "lobulated": ("bumpy",), "heterogeneous": ("patchy", "uneven"),
    "homogeneous": ("even", "smooth"), "hyperintense": ("bright",), "hypointense": ("dark",),
    "isointense": ("same-brightness",), "hyperintensity": ("bright area",), "hypointensity": ("dark area",),
    "hyperdense": ("bright",), "hypodense": ("dark",), "hyperechoic": ("bright",), "hypoechoic": ("dark",),
    "anechoic": ("black",), "echogenic": ("bright",), "opacity": ("cloudy patch", "haze"), "opacification": ("clouding",),
    "consolidation": ("solid patch",), "ground-glass": ("hazy",), "radiopaque": ("white",), "radiolucent": ("see-through",),
    "lucency": ("clear area",), "attenuation": ("density",), "enhancement": ("lighting up",), "enhancing": ("lighting up",),
    "peripheral": ("outer",), "central": ("middle",), "bilateral": ("both-sided",), "unilateral": ("one-sided",),
    "focal": ("local", "spot-like"), "diffuse": ("spread-out", "all over"), "multifocal": ("in many spots",),
    "subchondral": ("under-cartilage",), "osteophyte": ("bone spur",), "osteoarthritis": ("joint wear", "arthritis"),
    "joint space": ("gap",), "cartilage": ("gristle",), "effaced": ("flattened",), "vascular": ("blood-vessel",),
    "vasculature": ("blood vessels",), "vessel": ("vein",), "capillary": ("tiny vein",), "perfusion": ("blood flow",),
    "neovascularization": ("new blood vessels",), "microaneurysm": ("tiny bulge",), "exudate": ("leaky deposit",),
    "drusen": ("yellow deposits",), "macula": ("central retina",), "macular": ("central",), "fovea": ("center spot",),
    "foveal": ("center",), "retina": ("back of the eye",), "retinal": ("eye",), "optic disc": ("nerve head",),
    "choroid": ("eye layer",), "choroidal": ("eye-layer",), "cataract": ("cloudy lens",), "glaucoma": ("eye pressure disease",),
    "retinopathy": ("eye damage",), "diabetic": ("sugar-related",), "intraretinal": ("inside-the-eye",),
    "subretinal": ("under-the-eye-layer",),
    # cells and tissue
    "mucosa": ("lining",), "mucosal": ("lining",), "submucosa": ("under-lining",), "submucosal": ("under-lining",),
    "epithelium": ("surface layer",), "epithelial": ("surface",), "stroma": ("supporting tissue",),
    "stromal": ("supporting",), "parenchyma": ("organ tissue",), "parenchymal": ("tissue",), "cortex": ("outer layer",),
    "cortical": ("outer",), "medulla": ("inner part",), "medullary": ("inner",), "lumen": ("inside space",),
    "luminal": ("inner",), "nucleus": ("cell center",), "nuclei": ("cell centers",), "nuclear": ("cell-center",),
    "cytoplasm": ("cell fluid",), "cytoplasmic": ("cell-fluid",), "pleomorphism": ("odd shapes",),
    "pleomorphic": ("oddly shaped",), "mitotic": ("dividing",), "mitosis": ("cell division",), "mitoses": ("dividing cells",),
    "hyperchromatic": ("dark-stained",), "eosinophilic": ("pink",), "basophilic": ("bluish",), "lymphocyte": ("white cell",),
    "lymphocytic": ("white-cell",), "leukocyte": ("white blood cell",), "neutrophil": ("germ-fighting cell",),
    "eosinophil": ("allergy cell",), "basophil": ("rare white cell",), "monocyte": ("big white cell",),
    "platelet": ("clotting bit",), "erythrocyte": ("red cell",), "erythroblast": ("young red cell",),
    "granulocyte": ("grainy white cell",), "granule": ("speck",), "granular": ("grainy",), "adipocyte": ("fat cell",),
    "adipose": ("fatty",), "fibroblast": ("scar cell",), "keratinocyte": ("skin cell",), "melanocyte": ("pigment cell",),
    "melanocytic": ("mole",), "gland": ("sac",), "glandular": ("gland-like",), "crypt": ("pit",), "villi": ("tiny folds",),
    "tubule": ("small tube",), "tubular": ("tube-like",), "glomerulus": ("kidney filter",), "glomerular": ("kidney-filter",),
    "endothelial": ("vessel-lining",), "podocyte": ("filter cell",), "interstitial": ("in-between",), "debris": ("junk",),
    "mucus": ("slime",), "mucin": ("slime",), "collagen": ("connective fibres",), "fibrous": ("stringy",),
    "smooth muscle": ("gut muscle",), "squamous": ("flat-cell",), "keratin": ("horny material",),
    "keratinization": ("hardening",),
    # organs and anatomy
    "pulmonary": ("lung",), "renal": ("kidney",), "hepatic": ("liver",), "cardiac": ("heart",), "cerebral": ("brain",),
    "intracranial": ("inside-the-skull",), "extra-axial": ("outside-the-brain",), "dural": ("brain-lining",),
    "meninges": ("brain coverings",), "meningeal": ("brain-covering",), "ventricle": ("fluid space",),
    "ventricular": ("fluid-space",), "sellar": ("pituitary-area",), "suprasellar": ("above-the-pituitary",),
    "pituitary": ("hormone gland",), "hemisphere": ("half of the brain",), "midline shift": ("pushed-over brain",),
    "parenchymal brain": ("brain tissue",), "hydronephrosis": ("swollen kidney",), "calculus": ("stone",),
    "calculi": ("stones",), "nephrolithiasis": ("kidney stones",), "ureter": ("urine tube",), "esophagus": ("food pipe",),
    "esophageal": ("food-pipe",), "esophagitis": ("sore food pipe",), "gastric": ("stomach",), "pylorus": ("stomach outlet",),
    "pyloric": ("stomach-outlet",), "cecum": ("start of the large bowel",), "colon": ("large bowel",),
    "colonic": ("bowel",), "colorectal": ("bowel",), "rectal": ("back-passage",), "polyp": ("growth", "bump"),
    "colitis": ("bowel inflammation",), "friable": ("fragile",), "erosion": ("raw spot",), "hyperemia": ("redness",),
    "resection": ("removal",), "dermal": ("skin",), "epidermal": ("skin-surface",), "cutaneous": ("skin",),
    "keratosis": ("scaly patch",), "keratotic": ("scaly",), "nevus": ("mole",), "nevi": ("moles",),
    "melanoma": ("skin cancer",), "papule": ("bump",), "macule": ("flat spot",), "plaque": ("raised patch",),
    "telangiectasia": ("spider veins",), "hyperkeratosis": ("thick skin",), "pigmented": ("dark-colored",),
    "pigmentation": ("coloring",), "hyperpigmentation": ("dark patches",), "dermatofibroma": ("firm skin bump",),
    "femur": ("thigh bone",), "tibia": ("shin bone",), "pancreas": ("gland behind the stomach",),
    "spleen": ("organ under the ribs",), "bladder": ("pee sac",), "hepatocyte": ("liver cell",), "thoracic": ("chest",),
    "pleural": ("lung-lining",), "alveolar": ("air-sac",), "alveoli": ("air sacs",), "bronchial": ("airway",),
    "hilar": ("lung-root",), "pneumonia": ("lung infection",), "mammary": ("breast",), "axillary": ("armpit",),
    "ductal": ("milk-duct",), "lobular": ("lobe-like",),
    # imaging words a lay person would not use
    "radiograph": ("x-ray picture",), "radiographic": ("x-ray",), "sonographic": ("ultrasound-like",),
    "sonography": ("baby-scan imaging",), "tomography": ("scanning",), "histopathological": ("tissue",),
    "histological": ("tissue",), "histology": ("tissue study",), "dermoscopic": ("magnified skin",),
    "dermatoscopic": ("magnified skin",), "endoscopic": ("camera",), "endoscopy": ("camera exam",),
    "fundus": ("back of the eye",), "microscopic": ("magnified",), "micrograph": ("magnified picture",),
    "axial": ("cross-cut",), "coronal": ("front-facing",), "sagittal": ("side-on",),
}

# Ordinary words of report style → casual words; used when a sentence has too few clinical terms.
_CASUAL: Mapping[str, tuple[str, ...]] = {
    "demonstrates": ("shows",), "demonstrate": ("show",), "demonstrating": ("showing",), "shows": ("has",),
    "showing": ("having",), "show": ("have",), "reveals": ("shows",), "revealing": ("showing",),
    "exhibits": ("has",), "exhibiting": ("having",), "displays": ("has",), "displaying": ("having",),
    "appears": ("looks",), "appear": ("look",), "appearing": ("looking",), "appearance": ("look",),
    "presents": ("shows up",), "presenting": ("showing up",), "characterized": ("marked",),
    "characteristic": ("typical",), "typically": ("usually",), "typical": ("usual",), "frequently": ("often",),
    "predominantly": ("mostly",), "predominant": ("main",), "region": ("area",), "regions": ("areas",),
    "located": ("found",), "within": ("inside",), "adjacent": ("next",), "surrounding": ("around",),
    "multiple": ("lots of",), "numerous": ("loads of",), "large": ("big",), "larger": ("bigger",),
    "small": ("little",), "smaller": ("tinier",), "enlarged": ("swollen",), "thickened": ("thick",),
    "thickening": ("thick part",), "distinct": ("clear",), "prominent": ("obvious",), "visible": ("seen",),
    "evident": ("clear",), "indicating": ("meaning",), "indicates": ("means",), "suggestive": ("hinting",),
    "suggests": ("hints",), "consistent": ("in line",), "increased": ("more",), "decreased": ("less",),
    "reduced": ("less",), "absence": ("lack",), "absent": ("missing",), "presence": ("sign",),
    "intensity": ("brightness",), "density": ("thickness",), "texture": ("feel",), "pattern": ("look",),
    "structure": ("build",), "structures": ("parts",), "architecture": ("layout",), "preserved": ("kept",),
    "disrupted": ("broken",), "distorted": ("bent",), "uniform": ("even",), "scattered": ("spread",),
    "clusters": ("bunches",), "cluster": ("bunch",), "sheets": ("layers",), "image": ("picture",),
    "images": ("pictures",), "scan": ("picture",), "view": ("look",), "borders": ("edges",), "border": ("edge",),
    "well-defined": ("clear-cut",), "ill-defined": ("blurry",), "irregular": ("uneven",), "regular": ("even",),
    "rounded": ("roundish",), "oval": ("egg-shaped",), "elongated": ("long",), "approximately": ("about",),
    "several": ("a few",), "often": ("a lot",), "usually": ("mostly",), "may": ("might",), "can": ("could",),
    "with": ("plus",), "without": ("minus",), "and": ("plus",), "the": ("that",), "of": ("from",), "in": ("inside",),
    "is": ("seems",), "are": ("seem",), "a": ("one",), "an": ("one",), "on": ("over",), "from": ("off",),
    "to": ("toward",), "by": ("via",), "its": ("the",), "this": ("that",), "which": ("that",), "as": ("like",),
}

# Last resort of "lay": filler of the kind hasty lay text is full of.
_FILLERS: tuple[str, ...] = ("kind of", "sort of", "like", "stuff", "thing", "basically", "really", "just",
                             "pretty much", "something")

# Modality vocabulary: group → role → terms. A modality word is replaced by a word of the same
# role from another group ("hyperintense" → "hypoechoic"); roles with no counterpart fall back
# to another modality's name.
_MODALITY: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "mri": {"name": ("MRI", "MR", "magnetic resonance"),
            "technique": ("T1-weighted", "T2-weighted", "FLAIR", "gadolinium-enhanced", "diffusion-weighted",
                          "T1", "T2", "post-contrast"),
            "bright": ("hyperintense", "hyperintensity"), "dark": ("hypointense", "hypointensity"),
            "signal": ("signal", "sequence", "sequences")},
    "ct": {"name": ("CT", "computed tomography"),
           "technique": ("contrast-enhanced", "non-contrast", "Hounsfield", "multidetector", "portal-venous"),
           "bright": ("hyperdense", "hyperattenuating"), "dark": ("hypodense", "hypoattenuating"),
           "signal": ("attenuation", "density")},
    "ultrasound": {"name": ("ultrasound", "sonogram", "sonography", "sonographic"),
                   "technique": ("B-mode", "Doppler", "transducer", "elastography"),
                   "bright": ("hyperechoic", "echogenic"), "dark": ("hypoechoic", "anechoic"),
                   "signal": ("echotexture", "echogenicity", "shadowing")},
    "xray": {"name": ("X-ray", "radiograph", "radiography", "CXR", "chest film"),
             "technique": ("posteroanterior", "anteroposterior", "weight-bearing", "portable"),
             "bright": ("radiopaque", "opacity", "opacities"), "dark": ("radiolucent", "lucency", "lucent"),
             "signal": ("radiodensity",)},
    "histology": {"name": ("histology", "histopathology", "H&E", "microscopy"),
                  "technique": ("hematoxylin", "eosin", "stained", "staining", "immunohistochemistry", "slide"),
                  "bright": ("eosinophilic",), "dark": ("basophilic", "hyperchromatic"),
                  "signal": ("stain", "staining")},
    "endoscopy": {"name": ("endoscopy", "colonoscopy", "gastroscopy", "endoscopic"),
                  "technique": ("white-light", "narrow-band", "chromoendoscopy", "insufflation"),
                  "signal": ("mucosal",)},
    "fundus": {"name": ("fundus", "fundoscopy", "ophthalmoscopy", "fundus photograph"),
               "technique": ("red-free", "mydriatic", "non-mydriatic")},
    "oct": {"name": ("OCT", "optical coherence tomography", "B-scan", "B-scans"),
            "technique": ("spectral-domain", "swept-source", "en-face"),
            "bright": ("hyperreflective",), "dark": ("hyporeflective",), "signal": ("reflectivity",)},
    "dermoscopy": {"name": ("dermoscopy", "dermatoscopy", "dermoscopic", "dermatoscopic"),
                   "technique": ("polarized", "non-polarized", "epiluminescence", "immersion")},
}

# Unrelated report text for "mix" when no pool of other classes' sentences is given.
_UNRELATED: tuple[str, ...] = (
    "The patient was referred by the general practitioner for further evaluation of intermittent symptoms.",
    "Prior studies were not available for comparison at the time of this report.",
    "Report dictated by the attending physician and verified electronically on the same day.",
    "Follow-up is recommended in six months if clinically indicated by the treating team.",
    "The examination was performed without complications and was well tolerated overall.",
    "Clinical history includes hypertension, type two diabetes and a remote appendectomy.",
    "Please correlate with laboratory findings, medication history and physical examination.",
    "The referring clinician was informed of the results by telephone this afternoon.",
    "Written consent was obtained before the procedure according to institutional policy.",
    "Billing code and insurance authorisation are pending review by the administrative office.",
)

_KEYBOARD: Mapping[str, str] = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij", "i": "uok", "o": "ipl",
    "p": "ol", "a": "qsz", "s": "awdz", "d": "sefc", "f": "drgv", "g": "fthb", "h": "gyjn", "j": "hukm",
    "k": "jil", "l": "kop", "z": "asx", "x": "zsc", "c": "xdv", "v": "cfb", "b": "vgn", "n": "bhm", "m": "nj",
    "1": "2", "2": "13", "3": "24", "4": "35", "5": "46", "6": "57", "7": "68", "8": "79", "9": "80", "0": "9",
}


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if re.search(r"(s|x|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def _index(table: Mapping[str, tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Lowercase word-tuple keys (plurals of one-word keys added) → alternatives."""
    index: dict[tuple[str, ...], tuple[str, ...]] = {}
    for key, options in table.items():
        words = tuple(w.lower() for w in _WORD.findall(key))
        index[words] = options
        if len(words) == 1 and not key.endswith("s"):
            index.setdefault((_plural(key),), tuple(_plural(o) for o in options))
    return index


_LAY_INDEX = _index(_LAY)
_CASUAL_INDEX = _index(_CASUAL)
_MODALITY_INDEX: dict[tuple[str, ...], tuple[str, str]] = {
    tuple(w.lower() for w in _WORD.findall(term)): (group, role)
    for group, roles in _MODALITY.items() for role, terms in roles.items() for term in terms
}
_MAX_KEY = max(len(k) for k in (*_LAY_INDEX, *_MODALITY_INDEX))

# ------------------------------------------------------------------------------------ measuring


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` (letters and digits, inner hyphens and apostrophes kept)."""
    return [match.group(0).lower() for match in _WORD.finditer(text)]


def _changed_tokens(original: str, perturbed: str) -> tuple[int, int]:
    a, b = word_tokens(original), word_tokens(perturbed)
    return len(a), len(a) - _lcs_length(a, b)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (an optimal alignment).

    Not difflib.SequenceMatcher: its greedy longest-block matching is not optimal. After a
    shuffle that leaves no two kept words adjacent it can align one moved word far away and
    lose every kept word in between ("p q r s t" → "p s r t q" keeps "p r t" aligned, but the
    greedy match pairs the two q's and keeps 2), so it over-counted "shuffle" by up to 0.18 at
    ℓ = 0.6.
    """
    # The common prefix and suffix align as they are; dynamic programming on the rest, O(len·len).
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end = 0
    while end < len(a) - start and end < len(b) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start:len(a) - end], b[start:len(b) - end]
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return start + end + previous[-1]


TextOrBank = Union[str, Sequence[str], Mapping[str, Sequence[str]]]


def changed_fraction(original: TextOrBank, perturbed: TextOrBank) -> float:
    """Fraction of the original's word tokens that the perturbed text no longer aligns with.

    ``1 − matched / len(original)`` over lowercase word tokens, ``matched`` being the length of
    their longest common subsequence (an optimal alignment, unlike difflib's greedy one). For a
    list of texts or a bank (same classes, same number of sentences) the counts are summed
    first, so the fraction is token-weighted. An original without word tokens counts as
    unchanged (0.0).
    """
    pairs: list[tuple[str, str]]
    if isinstance(original, str):
        if not isinstance(perturbed, str):
            raise TypeError("changed_fraction: compare a string with a string")
        pairs = [(original, perturbed)]
    elif isinstance(original, Mapping):
        if not isinstance(perturbed, Mapping) or set(original) != set(perturbed):
            raise ValueError("changed_fraction: the two banks must have the same classes")
        pairs = []
        for name, texts in original.items():
            if len(texts) != len(perturbed[name]):
                raise ValueError(f"changed_fraction: class {name!r} has {len(texts)} original and "
                                 f"{len(perturbed[name])} perturbed sentences")
            pairs += list(zip(texts, perturbed[name]))
    else:
        if isinstance(perturbed, (str, Mapping)) or len(original) != len(perturbed):
            raise ValueError("changed_fraction: the two lists must have the same length")
        pairs = list(zip(original, perturbed))
    total = changed = 0
    for a, b in pairs:
        n, c = _changed_tokens(a, b)
        total, changed = total + n, changed + c
    return changed / total if total else 0.0


# ------------------------------------------------------------------------------------ editing


class _Plan:
    """Edits to the word tokens of one text: replacements (``""`` deletes) and insertions."""

    def __init__(self, text: str):
        self.text = text
        self.spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        self.words = [text[s:e] for s, e in self.spans]
        self.lower = [w.lower() for w in self.words]
        self.kind: dict[int, str] = {}  # token index -> kind of the edit that changed it
        self.replace: dict[int, str] = {}
        self.insert: dict[int, list[str]] = {}  # before token index; len(words) = at the end
        self.cut_tail = False

    @property
    def n(self) -> int:
        return len(self.words)

    def free(self, order: Sequence[int]) -> list[int]:
        return [i for i in order if i not in self.kind]

    def mark(self, index: int, kind: str, replacement: str) -> None:
        self.kind[index] = kind
        self.replace[index] = replacement

    def render(self) -> str:
        out, pos = [], 0
        for i, (start, end) in enumerate(self.spans):
            out.append(self.text[pos:start])
            if self.insert.get(i):
                out.append(" " + " ".join(self.insert[i]) + " ")
            out.append(self.replace.get(i, self.words[i]))
            pos = end
        if self.insert.get(self.n):
            out.append(" " + " ".join(self.insert[self.n]))
        tail = self.text[pos:]
        if self.cut_tail and "{}" not in tail:
            tail = ""  # a sentence cut short has no closing punctuation
        out.append(tail)
        return _tidy("".join(out))


def _tidy(text: str) -> str:
    """Whitespace and punctuation left behind by deleted words, cleaned up (words are not touched)."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\(\)", "", text)
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)
    text = re.sub(r"^[\s,;:.]+", "", text)
    return text.strip()


def _match_case(original: str, replacement: str) -> str:
    if replacement and original[:1].isupper() and not original.isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def _typo(word: str, rng: random.Random, avoid: set[str]) -> str:
    """A single character edit of ``word`` that is still one word token and a different one."""
    positions = [i for i, ch in enumerate(word) if ch.isalnum()]
    for _ in range(12):
        op = rng.choice(("swap", "delete", "substitute", "insert", "double"))
        i = rng.choice(positions)
        ch = word[i]
        near = _KEYBOARD.get(ch.lower(), "e")
        sub = rng.choice(near)
        sub = sub.upper() if ch.isupper() else sub
        if op == "swap" and i + 1 < len(word) and word[i + 1].isalnum():
            candidate = word[:i] + word[i + 1] + ch + word[i + 2:]
        elif op == "delete" and len(positions) > 1:
            candidate = word[:i] + word[i + 1:]
        elif op == "substitute":
            candidate = word[:i] + sub + word[i + 1:]
        elif op == "insert":
            candidate = word[:i] + sub + word[i:]
        elif op == "double":
            candidate = word[:i] + ch + word[i:]
        else:
            continue
        tokens = word_tokens(candidate)
        if len(tokens) == 1 and tokens[0] == candidate.lower() and tokens[0] not in avoid:
            return candidate
    return word + ("x" if not word.lower().endswith("x") else "q")


def _pick(options: Sequence[str], span_words: set[str], rng: random.Random) -> str | None:
    """A random option that shares no word with the span it replaces (so the span stays unaligned)."""
    usable = [o for o in options if not set(word_tokens(o)) & span_words]
    return rng.choice(usable) if usable else None


def _dictionary_spans(plan: _Plan, free: set[int], lookup) -> list[tuple[int, int, object]]:
    """Non-overlapping (start, length, entry) matches of a dictionary among free tokens, longest first."""
    spans, taken = [], set()
    for start in range(plan.n):
        for length in range(min(_MAX_KEY, plan.n - start), 0, -1):
            indices = range(start, start + length)
            if any(i not in free or i in taken for i in indices):
                continue
            entry = lookup(tuple(plan.lower[start:start + length]))
            if entry is not None:
                spans.append((start, length, entry))
                taken.update(indices)
                break
    return spans


def _replace_spans(plan: _Plan, kind: str, budget: int, spans, choose, rng: random.Random) -> int:
    """Replace dictionary spans (in random order) while they fit the budget; returns what is left."""
    spans = list(spans)
    rng.shuffle(spans)
    for start, length, entry in spans:
        if budget == 0:
            break
        indices = range(start, start + length)
        if length > budget or any(i in plan.kind for i in indices):
            continue
        replacement = choose(entry, set(plan.lower[start:start + length]))
        if replacement is None:
            continue
        plan.mark(start, kind, _match_case(plan.words[start], replacement))
        for i in indices[1:]:
            plan.mark(i, kind, "")
        budget -= length
    return budget


def _own_groups(plan: _Plan) -> set[str]:
    groups = set()
    for start in range(plan.n):
        for length in range(min(_MAX_KEY, plan.n - start), 0, -1):
            entry = _MODALITY_INDEX.get(tuple(plan.lower[start:start + length]))
            if entry:
                groups.add(entry[0])
                break
    return groups


def _apply_lay(plan: _Plan, budget: int, order: Sequence[int], rng: random.Random) -> None:
    # Replacements share no word with the sentence, not only with the span they replace: in "the
    # fundus" → "that back of the eye" the new "the" realigned with the replaced one, and "lay"
    # changed fewer words than its budget (−0.03 at ℓ = 0.5 on the retina bank).
    sentence = set(plan.lower)

    def choose(options: Sequence[str], used: set[str]) -> str | None:
        return _pick(options, used | sentence, rng)

    free = set(plan.free(order))
    spans = _dictionary_spans(plan, free, _LAY_INDEX.get)
    budget = _replace_spans(plan, "lay", budget, spans, choose, rng)
    if budget:
        casual = _dictionary_spans(plan, set(plan.free(order)), _CASUAL_INDEX.get)
        budget = _replace_spans(plan, "lay", budget, casual, choose, rng)
    for i in plan.free(order)[:budget]:
        filler = _pick(_FILLERS, sentence, rng) or _pick(("whatnot", "etcetera"), sentence, rng) or "zzz"
        plan.mark(i, "lay", filler)


def _apply_modality(plan: _Plan, budget: int, order: Sequence[int], rng: random.Random) -> None:
    own = _own_groups(plan)
    others = [g for g in _MODALITY if g not in own] or list(_MODALITY)

    def choose(entry: tuple[str, str], used: set[str]) -> str | None:
        group, role = entry
        options = [t for g in others if g != group for t in _MODALITY[g].get(role, ())]
        options = options or [t for g in others if g != group for t in _MODALITY[g]["name"]]
        return _pick(options, used, rng)

    spans = _dictionary_spans(plan, set(plan.free(order)), _MODALITY_INDEX.get)
    budget = _replace_spans(plan, "modality", budget, spans, choose, rng)
    # Fillers: one-word descriptors of another modality, so that a sentence with no modality word
    # still reads as mis-attributed rather than merely garbled.
    fillers = [t for g in others for terms in _MODALITY[g].values() for t in terms if len(word_tokens(t)) == 1]
    for i in plan.free(order)[:budget]:
        plan.mark(i, "modality", _pick(fillers, {plan.lower[i]}, rng) or "Doppler")


def _apply_truncate(plan: _Plan, budget: int) -> None:
    placeholders = [m.start() for m in re.finditer(r"\{\}", plan.text)]
    if placeholders:
        last, first = placeholders[-1], placeholders[0]
        tail = [i for i in reversed(range(plan.n)) if plan.spans[i][0] > last]
        head = [i for i in range(plan.n) if plan.spans[i][1] <= first]
        order = tail + head
    else:
        order = list(reversed(range(plan.n)))
    chosen = plan.free(order)[:budget]
    for i in chosen:
        plan.mark(i, "truncate", "")
    remaining = [i for i in range(plan.n) if plan.kind.get(i) != "truncate"]
    plan.cut_tail = bool(chosen) and (not remaining or max(remaining) < max(chosen))


def _apply_mix(plan: _Plan, budget: int, pool: Sequence[str], rng: random.Random) -> None:
    free = plan.free(range(plan.n))
    if budget == 0 or not free:
        return
    start = rng.randrange(len(free) - budget + 1)
    window = free[start:start + budget]
    used = {plan.lower[i] for i in window}
    fragment: list[str] = []
    sources = [t for t in pool if t.strip()] or list(_UNRELATED)
    for _ in range(8):  # take words from random pool sentences until the fragment is long enough
        source = rng.choice(sources)
        words = [w for w in _WORD.findall(source) if w.lower() not in used]
        if words:
            offset = rng.randrange(len(words))
            fragment += words[offset:offset + budget - len(fragment)]
        if len(fragment) >= budget:
            break
    if not fragment:
        fragment = ["unrelated"] if "unrelated" not in used else ["misc"]
    plan.mark(window[0], "mix", " ".join(fragment))
    for i in window[1:]:
        plan.mark(i, "mix", "")


def _apply_shuffle(plan: _Plan, moved: Sequence[int], rng: random.Random) -> None:
    """Move ``moved`` tokens to other gaps between unchanged tokens, in reversed order.

    Reversed order means no two moved words can both realign; a gap other than a word's own
    means it cannot realign alone without unaligning an unchanged word.
    """
    if not moved:
        return
    moved = sorted(moved)
    moving = set(moved)
    kept = [i for i in range(plan.n) if i not in plan.kind and i not in moving]
    own_gap = {m: sum(1 for k in kept if k < m) for m in moved}
    gaps: list[int] = []
    for _ in range(20):
        gaps = sorted((rng.randint(0, len(kept)) for _ in moved), reverse=True)
        if all(g != own_gap[m] for g, m in zip(gaps, moved)):
            break
    else:  # nudge the clashing gaps within the bounds that keep the order reversed
        for j, m in enumerate(moved):
            if gaps[j] == own_gap[m]:
                high = gaps[j - 1] if j > 0 else len(kept)
                low = gaps[j + 1] if j + 1 < len(moved) else 0
                options = [g for g in (gaps[j] - 1, gaps[j] + 1) if low <= g <= high and g != own_gap[m]]
                if options:
                    gaps[j] = rng.choice(options)
    for m in moved:
        plan.mark(m, "shuffle", "")
    for gap, m in reversed(list(zip(gaps, moved))):
        anchor = kept[gap] if gap < len(kept) else plan.n
        plan.insert.setdefault(anchor, []).append(plan.words[m])


def _try_clause_move(plan: _Plan, budget: int, rng: random.Random) -> bool:
    """Move one run of ``budget`` words past at least ``budget`` others (a clause moved), if possible."""
    n = plan.n
    starts = [s for s in range(n - budget + 1) if s >= budget or (n - budget) - s >= budget]
    if budget < 2 or not starts:
        return False
    start = rng.choice(starts)
    kept = [i for i in range(n) if not start <= i < start + budget]
    targets = [g for g in range(len(kept) + 1) if abs(g - start) >= budget]
    gap = rng.choice(targets)
    for i in range(start, start + budget):
        plan.mark(i, "shuffle", "")
    anchor = kept[gap] if gap < len(kept) else n
    plan.insert.setdefault(anchor, []).extend(plan.words[start:start + budget])
    return True


def _check(level: float, kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind {kind!r} is not a noise kind; use one of {', '.join(NOISE_KINDS)}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or math.isnan(level) or not 0 <= level <= 1:
        raise ValueError(f"level must be a number in [0, 1] (the expected fraction of words changed), got {level!r}")


def perturb_text(text: str, level: float, seed: Seed, kind: str = "mixed", *, pool: Sequence[str] = ()) -> str:
    """``text`` with about ``level`` of its word tokens changed by noise of ``kind``.

    Args:
        text: a sentence or a template (its ``{}`` is kept as is).
        level: expected fraction of word tokens changed, in ``[0, 1]``; 0 returns ``text``.
        seed: seeds a private :class:`random.Random` (an int or a string).
        kind: one of :data:`NOISE_KINDS`; ``"mixed"`` draws a kind per edited word.
        pool: sentences that "mix" takes irrelevant fragments from (e.g. other classes'
            descriptions); empty = built-in unrelated report text.
    """
    _check(level, kind)
    if level == 0:
        return text
    plan = _Plan(text)
    if plan.n == 0:
        return text
    rng = random.Random(seed)
    # Draws that fix *which* tokens change come first and do not depend on the level, so a higher
    # level with the same seed extends the selection of a lower one.
    fraction_draw = rng.random()
    order = list(range(plan.n))
    rng.shuffle(order)
    kinds = [rng.choice(_EDIT_KINDS) for _ in range(plan.n)] if kind == "mixed" else [kind] * plan.n
    exact = level * plan.n
    budget = min(plan.n, math.floor(exact) + (1 if fraction_draw < exact - math.floor(exact) else 0))
    if budget == 0:
        return text
    counts = Counter(kinds[:budget])

    # Span edits first (they need contiguous or positional tokens), then dictionary edits, then
    # the single-token edits on whatever is left, in the seeded priority order.
    if counts["truncate"]:
        _apply_truncate(plan, counts["truncate"])
    if counts["mix"]:
        _apply_mix(plan, counts["mix"], pool, rng)
    if counts["lay"]:
        _apply_lay(plan, counts["lay"], order, rng)
    if counts["modality"]:
        _apply_modality(plan, counts["modality"], order, rng)
    avoid = set(plan.lower)
    free = plan.free(order)
    typo, free = free[:counts["typo"]], free[counts["typo"]:]
    for i in typo:
        plan.mark(i, "typo", _typo(plan.words[i], rng, avoid))
    drop, free = free[:counts["drop"]], free[counts["drop"]:]
    for i in drop:
        plan.mark(i, "drop", "")
    if counts["shuffle"]:
        clause = kind == "shuffle" and rng.random() < 0.5 and _try_clause_move(plan, counts["shuffle"], rng)
        if not clause:
            _apply_shuffle(plan, free[:counts["shuffle"]], rng)
    return plan.render()


def perturb_template(template: str, level: float, seed: Seed, kind: str = "mixed") -> str:
    """A degraded template: :func:`perturb_text` on a template text or id; its ``{}`` is kept.

    ``template`` may be a template id (``"clinical/btmri"``) or a template text.
    """
    from .templates import resolve_template

    text = resolve_template(template)
    result = perturb_text(text, level, seed, kind)
    if result.count("{}") != text.count("{}"):  # cannot happen: "{}" is never a word token
        raise AssertionError(f"perturbation damaged the placeholder of {text!r}: {result!r}")
    return result


def perturb_bank(
    bank: Mapping[str, Sequence[str]], level: float, seed: Seed, kind: str = "mixed"
) -> dict[str, list[str]]:
    """Every sentence of a bank degraded at ``level``; the classes and sentence counts are kept.

    Each sentence gets its own generator, seeded from ``(seed, class name, index)``, so the
    result of one sentence does not depend on the others. "mix" takes its fragments from the
    other classes' sentences (irrelevant to this class, realistic in style).
    """
    _check(level, kind)
    names = list(bank)
    result: dict[str, list[str]] = {}
    for name in names:
        pool = [text for other in names if other != name for text in bank[other]] if kind in ("mix", "mixed") else ()
        result[name] = [
            perturb_text(text, level, f"{seed}|{name}|{i}", kind, pool=pool) for i, text in enumerate(bank[name])
        ]
    return result
