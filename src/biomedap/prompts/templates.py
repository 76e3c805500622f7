"""Prompt templates, addressable by id.

A template is a string with one ``{}`` where the class name goes (``"a photo of a {}."``), or, for
context-initialisation phrases and the ``"quality/empty"`` level, none. Ids:

* ``"generic"`` — ``"a photo of a {}."``, the zero-shot template of CoOp, BiomedCoOp and the
  BiomedCLIP baseline, used for every catalog dataset.
* ``"clinical/<dataset key>"`` — the dataset-specific clinical template (Biomed-DPT / BiomedAP's
  ``CUSTOM_BIOMEDDPT_TEMPLATES`` for the 11 benchmark datasets, e.g. ``"clinical/btmri"`` =
  ``"a MR photo of a {} in the brain."``; for MedMNIST+, e.g. ``"clinical/medmnist/pathmnist"``,
  our wording of BioVLM's per-dataset descriptor frames).
* ``"ctx_init/<dataset key>"`` — the phrase that initialises the learned context (``CTX_INIT``):
  the clinical template up to the class name, e.g. ``"a MR photo of a"``.
* ``"quality/<level>"`` — the five prompt-quality levels of BiomedAP's robustness figure
  (``ZERO_SHOT_TEMPLATES``), best first: ``medical_minimal`` (the figure's "Abstract"),
  ``generic``, ``article``, ``minimal``, ``empty`` (see :data:`QUALITY_LEVELS`).

``"quality/empty"`` is the empty string: it has no placeholder, so :func:`format_template` drops
the class name and returns ``""`` for every class. A method that takes it as its low-quality
anchor (BiomedAP's ``LOW_TEMPLATE_TYPE``) therefore encodes the same text — BERT's ``[CLS] [SEP]``
— for every class: a class-independent anchor, which is the point of that level. (The released
BiomedAP code encodes the one-word string "X" at this level instead of ""; both are the same text
for every class, and BiomedAP's ``variant="released"`` in :mod:`biomedap.methods` may use "X".) A zero-shot
classifier cannot use it (all classes would score the same), so the zero-shot method rejects
templates without ``{}``.

Templates are written with ``{}``; the published files use ``{class}`` in ``ZERO_SHOT_TEMPLATES``
— :func:`format_template` rejects anything but ``{}`` with a message that says so.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "GENERIC",
    "PLACEHOLDER",
    "QUALITY_LEVELS",
    "TEMPLATES",
    "format_template",
    "get_template",
    "list_templates",
    "resolve_template",
    "template_source",
]

PLACEHOLDER = "{}"
GENERIC = "generic"

_DPT = "Biomed-DPT / BiomedAP CUSTOM_BIOMEDDPT_TEMPLATES"
_CTX = "Biomed-DPT / BiomedAP CTX_INIT"
_OURS = "biomedap, from BioVLM's descriptor frame for this dataset"
_QUALITY = "BiomedAP ZERO_SHOT_TEMPLATES (robustness figure)"

# (id, text, source). The benchmark rows are copied from biomed-methods.md §2.3, grammar included
# ("a MR photo", "a ultrasound photo"): published numbers were obtained with exactly these strings.
_ROWS: tuple[tuple[str, str, str], ...] = (
    (GENERIC, "a photo of a {}.", "CoOp / BiomedCoOp zero-shot CUSTOM_TEMPLATES (every dataset)"),
    # benchmark: clinical templates and context initialisation
    ("clinical/btmri", "a MR photo of a {} in the brain.", _DPT),
    ("clinical/busi", "a ultrasound photo of a {} in the breast.", _DPT),
    ("clinical/chmnist", "a histopathological photo of a {}.", _DPT),
    ("clinical/covid", "a chest X-ray photo of a {} affected by COVID-19 in the lung.", _DPT),
    ("clinical/ctkidney", "a CT photo of a {} in the kidney.", _DPT),
    ("clinical/dermamnist", "a dermatoscopy photo of a {} in the skin.", _DPT),
    ("clinical/kneexray", "a frontal X-ray photo of a {} in the knee joint.", _DPT),
    ("clinical/kvasir", "a endoscopic photo of a {} in the colon.", _DPT),
    ("clinical/lungcolon", "a histopathological photo of a {}.", _DPT),
    ("clinical/octmnist", "a OCT photo of a {}.", _DPT),
    ("clinical/retina", "a photo of a {} presented in image.", _DPT),
    ("ctx_init/btmri", "a MR photo of a", _CTX),
    ("ctx_init/busi", "a ultrasound photo of a", _CTX),
    ("ctx_init/chmnist", "a histopathological photo of a", _CTX),
    ("ctx_init/covid", "a chest X-ray photo of a", _CTX),
    ("ctx_init/ctkidney", "a CT photo of a", _CTX),
    ("ctx_init/dermamnist", "a dermatoscopy photo of a", _CTX),
    ("ctx_init/kneexray", "a frontal X-ray photo of a", _CTX),
    ("ctx_init/kvasir", "a endoscopic photo of a", _CTX),
    ("ctx_init/lungcolon", "a histopathological photo of a", _CTX),
    ("ctx_init/octmnist", "a OCT photo of a", _CTX),
    ("ctx_init/retina", "a photo of a", _CTX),
    # MedMNIST+: no published clinical template; these follow BioVLM's frames (§6.6) and keep the
    # benchmark's rule that the context phrase is the template up to the class name.
    ("clinical/medmnist/pathmnist", "a colon pathology image of {}.", _OURS),
    ("clinical/medmnist/dermamnist", "a dermatoscopic image of {}, a type of skin lesion.", _OURS),
    ("clinical/medmnist/octmnist", "an optical coherence tomography image of {} in the retina.", _OURS),
    ("clinical/medmnist/pneumoniamnist", "a pediatric chest X-ray image of {}.", _OURS),
    ("clinical/medmnist/retinamnist", "a fundus image of {}.", _OURS),
    ("clinical/medmnist/breastmnist", "an ultrasound image of {} breast tissue.", _OURS),
    ("clinical/medmnist/bloodmnist", "a microscopic image of {}, a type of blood cell.", _OURS),
    ("clinical/medmnist/tissuemnist", "a microscopic image of {}, a type of kidney cortex cell.", _OURS),
    ("clinical/medmnist/organamnist", "a cropped axial CT slice of the {}.", _OURS),
    ("clinical/medmnist/organcmnist", "a cropped coronal CT slice of the {}.", _OURS),
    ("clinical/medmnist/organsmnist", "a cropped sagittal CT slice of the {}.", _OURS),
    ("ctx_init/medmnist/pathmnist", "a colon pathology image of", _OURS),
    ("ctx_init/medmnist/dermamnist", "a dermatoscopic image of", _OURS),
    ("ctx_init/medmnist/octmnist", "an optical coherence tomography image of", _OURS),
    ("ctx_init/medmnist/pneumoniamnist", "a pediatric chest X-ray image of", _OURS),
    ("ctx_init/medmnist/retinamnist", "a fundus image of", _OURS),
    ("ctx_init/medmnist/breastmnist", "an ultrasound image of", _OURS),
    ("ctx_init/medmnist/bloodmnist", "a microscopic image of", _OURS),
    ("ctx_init/medmnist/tissuemnist", "a microscopic image of", _OURS),
    ("ctx_init/medmnist/organamnist", "a cropped axial CT slice of the", _OURS),
    ("ctx_init/medmnist/organcmnist", "a cropped coronal CT slice of the", _OURS),
    ("ctx_init/medmnist/organsmnist", "a cropped sagittal CT slice of the", _OURS),
    # BiomedAP's prompt-quality levels, best first ({class} written as {}).
    ("quality/medical_minimal", "a medical image of {}", _QUALITY + ", level 'Abstract'"),
    ("quality/generic", "a photo of {}", _QUALITY + ", level 'Generic'"),
    ("quality/article", "a {}", _QUALITY + ", level 'Article'"),
    ("quality/minimal", "{}", _QUALITY + ", level 'Minimal'"),
    ("quality/empty", "", _QUALITY + ", level 'Empty' (no class name: the same text for every class)"),
)

TEMPLATES: Mapping[str, str] = MappingProxyType({tid: text for tid, text, _ in _ROWS})
"""Every template by id (read-only)."""

_SOURCES: Mapping[str, str] = MappingProxyType({tid: source for tid, _, source in _ROWS})

QUALITY_LEVELS: tuple[str, ...] = (
    "quality/medical_minimal", "quality/generic", "quality/article", "quality/minimal", "quality/empty",
)
"""Template ids of BiomedAP's robustness figure in decreasing prompt quality (Abstract → Empty)."""


def list_templates(pattern: str | None = None) -> list[str]:
    """Template ids, in table order; ``pattern`` filters them with shell wildcards (``"clinical/*"``)."""
    ids = list(TEMPLATES)
    return ids if pattern is None else [tid for tid in ids if fnmatch.fnmatchcase(tid, pattern)]


def get_template(template_id: str) -> str:
    """The text of template ``template_id``.

    Raises:
        KeyError: unknown id; the message suggests the closest ids and says how to list them.
    """
    try:
        return TEMPLATES[template_id]
    except KeyError:
        close = difflib.get_close_matches(str(template_id), list(TEMPLATES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"Unknown template id {template_id!r}.{hint} Ids: 'generic', 'clinical/<dataset key>', "
            "'ctx_init/<dataset key>', 'quality/<level>'; list_templates() (or `biomedap prompts templates`) "
            "lists them all."
        ) from None


def template_source(template_id: str) -> str:
    """Where template ``template_id`` comes from (paper / code it reproduces)."""
    get_template(template_id)  # the same error for unknown ids
    return _SOURCES[template_id]


def resolve_template(id_or_text: str) -> str:
    """A template id's text, or ``id_or_text`` itself when it is not an id (a literal template)."""
    return TEMPLATES.get(id_or_text, id_or_text)


def format_template(template: str, classname: str) -> str:
    """``template`` with its ``{}`` replaced by ``classname``.

    A template without ``{}`` (``"quality/empty"``, a context phrase) is returned unchanged: the
    class name is dropped. Braces are not interpreted otherwise, so class names may contain any
    character.

    Raises:
        ValueError: the template has more than one ``{}`` or a named placeholder such as ``{class}``.
    """
    count = template.count(PLACEHOLDER)
    if count > 1:
        raise ValueError(f"template {template!r} has {count} '{{}}' placeholders; use exactly one for the class name")
    # A named field ("{class}", "{0}") is an error even beside a "{}": it would reach the encoder verbatim.
    named = re.search(r"\{[^{}]+\}", template)
    if named or (count == 0 and "{" in template and "}" in template):
        raise ValueError(f"template {template!r} has a named placeholder; write '{{}}' where the class name goes "
                         "(the published files' '{class}' is '{}' here)")
    return template.replace(PLACEHOLDER, classname)
