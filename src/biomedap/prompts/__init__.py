"""Clinical prompt knowledge: templates, description banks, attribute lists, perturbations.

* :mod:`.templates` — every prompt template by id (``generic``, ``clinical/<dataset>``,
  ``ctx_init/<dataset>``, ``quality/<level>``).
* :mod:`.banks` — the built-in description banks and attribute lists (package data), user banks
  from JSON or Python-literal files, and the ``descriptions`` option of methods.
* :mod:`.perturb` — seeded, calibrated noise for banks and templates (robustness protocol).
* :mod:`.quality` — the gates every built-in bank passes (``biomedap prompts check``).
"""

from .banks import (
    AmbiguousBankError,
    AttributeFrame,
    BankError,
    BankFormatError,
    BankMatch,
    MissingBankError,
    attribute_sentences,
    check_against,
    find_bank,
    list_banks,
    load_attributes,
    load_bank,
    load_bank_file,
    load_external_bank,
    require_bank,
    resolve_descriptions,
    skeleton_bank,
)
from .perturb import NOISE_KINDS, changed_fraction, perturb_bank, perturb_template, perturb_text
from .templates import QUALITY_LEVELS, TEMPLATES, format_template, get_template, list_templates, resolve_template

__all__ = [
    "NOISE_KINDS",
    "QUALITY_LEVELS",
    "TEMPLATES",
    "AmbiguousBankError",
    "AttributeFrame",
    "BankError",
    "BankFormatError",
    "BankMatch",
    "MissingBankError",
    "attribute_sentences",
    "changed_fraction",
    "check_against",
    "find_bank",
    "format_template",
    "get_template",
    "list_banks",
    "list_templates",
    "load_attributes",
    "load_bank",
    "load_bank_file",
    "load_external_bank",
    "perturb_bank",
    "perturb_template",
    "perturb_text",
    "require_bank",
    "resolve_descriptions",
    "resolve_template",
    "skeleton_bank",
]
