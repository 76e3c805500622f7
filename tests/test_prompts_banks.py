"""Description banks and attribute lists: the built-in resource gates, and the loaders."""

import json
from functools import lru_cache

import pytest

from biomedap.data import DatasetSpec, UnknownDatasetError, get_dataset_spec
from biomedap.data.catalog import list_all_datasets
from biomedap.prompts import banks
from biomedap.prompts.banks import (
    AmbiguousBankError,
    AttributeFrame,
    BankError,
    BankFormatError,
    MissingBankError,
    attribute_sentences,
    check_against,
    find_bank,
    list_banks,
    load_attributes,
    load_bank,
    load_external_bank,
    require_bank,
    skeleton_bank,
)
from biomedap.prompts.quality import (
    ATTRIBUTES_PER_CLASS,
    MAX_CHARS,
    MAX_CLIP_TOKENS,
    check_attributes,
    check_bank,
    clip_token_count,
)

ALL_SPECS = list_all_datasets()
BTMRI = list(get_dataset_spec("btmri").classnames)
ORGANS = list(get_dataset_spec("medmnist/organamnist").classnames)


@lru_cache(maxsize=None)
def _bank(key):
    return load_bank(key)


# ============================================================================ built-in resource gates
# Parametrised over every catalog dataset (benchmark and MedMNIST+): a dataset without its
# resource files fails here with MissingBankError naming the file.


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_builtin_bank_has_the_catalog_classes_in_label_order(spec):
    assert list(_bank(spec.key)) == list(spec.classnames)
    assert spec.key in list_banks()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_builtin_bank_passes_the_quality_gates(spec):
    bank = _bank(spec.key)
    report = check_bank(bank, spec.classnames, spec.key)  # 50 sentences per class, the default
    assert report.ok, report.summary()
    for name, sentences in bank.items():
        assert len(set(sentences)) >= 50, name


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_builtin_sentences_fit_every_text_encoder(spec):
    # BiomedCLIP's PubMedBERT context holds 256 WordPiece tokens. The CLIP gate is the stricter
    # bound we check: <= 77 CLIP BPE tokens (start/end included), so CLIP-style towers take each
    # sentence whole; and <= 200 characters, so even one WordPiece per character plus [CLS]/[SEP]
    # (<= 202) stays below 256.
    for name, sentences in _bank(spec.key).items():
        for sentence in sentences:
            assert len(sentence) <= MAX_CHARS, (name, sentence)
            assert clip_token_count(sentence) <= MAX_CLIP_TOKENS <= 256, (name, sentence)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_builtin_attributes(spec):
    frame, table = load_attributes(spec)
    assert isinstance(frame, AttributeFrame) and frame.prefix.strip()
    assert list(table) == list(spec.classnames)
    assert all(len(phrases) == ATTRIBUTES_PER_CLASS for phrases in table.values())
    raw = {"frame": {"prefix": frame.prefix, "suffix": frame.suffix}, "attributes": table}
    report = check_attributes(raw, spec.classnames, spec.key)
    assert report.ok, report.summary()
    assert spec.key in list_banks("attributes")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.key)
def test_attribute_sentences_follow_the_frame(spec):
    frame, table = load_attributes(spec)
    for name in spec.classnames:
        sentences = attribute_sentences(spec, name)
        head = " ".join(p.strip() for p in (frame.prefix, name, frame.suffix) if p.strip())
        assert sentences == [f"{head}, which {a.strip().rstrip('.')}." for a in table[name]]
        start = frame.prefix.strip() + " " + name
        assert all(s.startswith(start) and s.endswith(".") and not s.endswith("..") for s in sentences)


# ============================================================================ attribute helpers


def test_attribute_sentences_from_a_frame_and_table():
    table = {"glioma": ["has an irregular rim.", " spreads along white matter "]}
    assert attribute_sentences(({"prefix": "an MRI of a", "suffix": "tumour"}, table), "glioma") == [
        "an MRI of a glioma tumour, which has an irregular rim.",
        "an MRI of a glioma tumour, which spreads along white matter.",
    ]
    first = attribute_sentences((AttributeFrame("an MRI of"), table), "glioma")[0]
    assert first == "an MRI of glioma, which has an irregular rim."
    with pytest.raises(KeyError, match="classes with attributes: \\['glioma'\\]"):
        attribute_sentences((AttributeFrame("x"), table), "meningioma")
    with pytest.raises(BankFormatError, match="frame must be"):
        attribute_sentences(({"suffix": "x"}, table), "glioma")


# ============================================================================ built-in loaders


def _fake_resources(monkeypatch, tmp_path, specs, files):
    """Point the built-in loaders at ``files`` ({resource_id: json data}) for catalog ``specs``."""
    for stem, data in files.items():
        text = data if isinstance(data, str) else json.dumps(data)
        (tmp_path / f"{stem}.json").write_text(text, encoding="utf-8")
    monkeypatch.setattr(banks, "list_all_datasets", lambda: tuple(specs))
    monkeypatch.setattr(banks, "_resource", lambda kind, spec: tmp_path / f"{spec.resource_id}.json")


def _spec(key, classnames):
    return DatasetSpec(name=key.upper(), key=key, classnames=tuple(classnames), modality="MRI", organ="brain")


def test_find_bank_prefers_an_exact_match_over_a_covering_bank(monkeypatch, tmp_path):
    full, half = _spec("full", "abcd"), _spec("half", "ab")
    _fake_resources(monkeypatch, tmp_path, [full, half], {"full": {}, "half": {}})
    assert find_bank(["a", "b"]) == "half"  # exact beats covering
    assert find_bank(["b", "a", "a"]) == "half"  # order and repeats do not matter
    assert find_bank(["a", "b", "c"]) == "full"  # only one covers
    with pytest.raises(AmbiguousBankError, match="full, half"):
        find_bank(["a"])  # both cover, neither exactly
    assert find_bank(["a"], dataset=half) == "half"


def test_find_bank_on_the_builtin_banks():
    assert find_bank(BTMRI) == "btmri"
    base = list(get_dataset_spec("btmri").base_classnames)
    assert base == BTMRI[:2] and find_bank(base) == "btmri"  # the base half is covered
    assert find_bank(["no such class"]) is None
    assert find_bank(["Glioma Tumor"]) is None  # names must match exactly
    assert find_bank(BTMRI, dataset="busi") is None


def test_organ_class_names_are_ambiguous_until_the_dataset_is_named():
    with pytest.raises(AmbiguousBankError) as info:
        find_bank(ORGANS)
    message = str(info.value)
    assert "medmnist/organamnist" in message and "medmnist/organsmnist" in message
    assert "dataset=" in message
    assert isinstance(info.value, BankError) and isinstance(info.value, ValueError)
    assert find_bank(ORGANS, dataset="medmnist/organamnist") == "medmnist/organamnist"
    assert find_bank(ORGANS[:3], dataset="medmnist-organsmnist") == "medmnist/organsmnist"
    with pytest.raises(AmbiguousBankError):
        require_bank(ORGANS[:2])
    assert list(require_bank(ORGANS[:2], "medmnist/organamnist", limit=1)) == ORGANS[:2]


def test_require_bank_keeps_the_given_order_and_the_limit():
    wanted = BTMRI[::-1]
    bank = require_bank(wanted, limit=3)
    assert list(bank) == wanted
    full = load_bank("btmri")
    assert all(bank[name] == full[name][:3] for name in wanted)
    assert require_bank(BTMRI)["glioma tumor"] == full["glioma tumor"]


def test_require_bank_missing_points_to_prompts_init():
    with pytest.raises(MissingBankError) as info:
        require_bank(["cat", "dog"], method="BiomedCoOp")
    message = str(info.value)
    assert "BiomedCoOp needs class descriptions for ['cat', 'dog']" in message
    assert "biomedap prompts init" in message
    assert "btmri" in message  # lists the built-in banks
    with pytest.raises(MissingBankError, match="the built-in bank of busi does not"):
        require_bank(BTMRI, dataset="busi")


def test_load_bank_orders_classes_by_label_and_keeps_extras_last(monkeypatch, tmp_path):
    spec = _spec("toy", ["b", "a"])
    _fake_resources(monkeypatch, tmp_path, [spec], {"toy": {"extra": ["e"], "a": ["x"], "b": ("y", "z")}})
    bank = load_bank(spec)
    assert list(bank) == ["b", "a", "extra"] and bank["b"] == ["y", "z"]
    bank["b"].append("mutated")
    assert load_bank(spec)["b"] == ["y", "z"]  # a fresh copy every time


def test_load_bank_errors(monkeypatch, tmp_path):
    with pytest.raises(UnknownDatasetError):
        load_bank("imagenet")
    good, broken, wrong = _spec("good", "a"), _spec("broken", "a"), _spec("wrong", "a")
    _fake_resources(monkeypatch, tmp_path, [good, broken, wrong],
                    {"good": {"a": ["s"]}, "broken": "{not json", "wrong": {"a": "not a list"}})
    missing = _spec("missing", "a")
    with pytest.raises(MissingBankError) as info:
        load_bank(missing)
    assert "descriptions/missing.json does not exist" in str(info.value)
    assert "descriptions exist for: good, broken, wrong." in str(info.value)
    assert "biomedap prompts init" in str(info.value)
    with pytest.raises(BankFormatError, match="not valid JSON"):
        load_bank(broken)
    with pytest.raises(BankFormatError, match="'a' must map to a list of sentences"):
        load_bank(wrong)
    with pytest.raises(MissingBankError, match="No built-in attribute list"):
        load_attributes(missing)


def test_list_banks_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="descriptions"):
        list_banks("templates")  # type: ignore[arg-type]


# ============================================================================ user banks


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_external_json_bank(tmp_path):
    path = _write(tmp_path, "bank.json", json.dumps({"cat": ["a cat."], "dog": ["a dog.", "a puppy."]}))
    assert load_external_bank(path) == {"cat": ["a cat."], "dog": ["a dog.", "a puppy."]}
    assert load_external_bank(str(path)) == load_external_bank(path)


def test_external_json_with_several_banks(tmp_path):
    data = {"A": {"cat": ["a cat."]}, "B": {"cat": ["another cat."]}, "version": 2}
    path = _write(tmp_path, "banks.json", json.dumps(data))
    assert load_external_bank(path, name="B") == {"cat": ["another cat."]}
    with pytest.raises(BankFormatError, match=r"several banks \(A, B\); pick one with name="):
        load_external_bank(path)
    with pytest.raises(BankFormatError, match=r"no bank named 'C'; its banks .*\['A', 'B'\]"):
        load_external_bank(path, name="C")


def test_external_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_external_bank(tmp_path / "absent.json")
    with pytest.raises(BankFormatError, match="not valid JSON"):
        load_external_bank(_write(tmp_path, "bad.json", "{"))
    with pytest.raises(BankFormatError, match="must map each class name"):
        load_external_bank(_write(tmp_path, "list.json", '["a", "b"]'))
    with pytest.raises(BankFormatError, match="must be .json or .py"):
        load_external_bank(_write(tmp_path, "bank.txt", "{}"))


PY_BANKS = '''"""Banks as the published prompt_templates.py writes them."""

BIOMEDCOOP_TEMPLATES = {
    "glioma tumor": ["a glioma.", "an infiltrative glioma."],
    "normal brain": ("a normal brain.",),
}
OTHER: dict = {"glioma tumor": ["x"], "normal brain": ["y"]}
VERSION = -1
NAMES = ["not", "a", "bank"]
'''


def test_external_python_bank_is_read_as_data(tmp_path):
    path = _write(tmp_path, "prompt_templates.py", PY_BANKS)
    assert load_external_bank(path, name="BIOMEDCOOP_TEMPLATES") == {
        "glioma tumor": ["a glioma.", "an infiltrative glioma."], "normal brain": ["a normal brain."]}
    assert load_external_bank(path, name="OTHER") == {"glioma tumor": ["x"], "normal brain": ["y"]}
    with pytest.raises(BankFormatError, match=r"several banks \(BIOMEDCOOP_TEMPLATES, OTHER\)"):
        load_external_bank(path)
    with pytest.raises(BankFormatError, match="no bank named 'VERSION'"):
        load_external_bank(path, name="VERSION")
    single = _write(tmp_path, "single.py", 'X = {"cat": ["a cat."]}\nN = 3\n')
    assert load_external_bank(single) == {"cat": ["a cat."]}
    with pytest.raises(BankFormatError, match="defines no bank"):
        load_external_bank(_write(tmp_path, "empty.py", '"""Only a docstring."""\n'))


def test_python_bank_with_a_call_is_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned_marker"
    source = f'X = {{"cat": ["a cat."]}}\nY = {{"a": [open({str(marker)!r}, "w").write("x")]}}\n'
    path = _write(tmp_path, "evil.py", source)
    with pytest.raises(BankFormatError) as info:
        load_external_bank(path, name="X")  # even the harmless bank is not returned
    message = str(info.value)
    assert f"{path}:2:" in message and "a function call" in message and "never executed" in message
    assert not marker.exists()
    exec(compile(source, str(path), "exec"), {})  # the payload is live: executing the file would create it
    assert marker.exists()


def test_python_bank_with_an_import_is_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "touched_marker"
    source = f'"""Doc."""\nX = {{"cat": ["a cat."]}}\nimport os; os.system("touch {marker}")\n'
    path = _write(tmp_path, "evil.py", source)
    with pytest.raises(BankFormatError) as info:
        load_external_bank(path)
    assert f"{path}:3: found an import" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("value,what", [
    ('[f"a {1}"]', "an f-string"),
    ("[NAME]", "a variable reference"),
    ('[s for s in "ab"]', "a comprehension"),
    ('{k: ["s"] for k in "ab"}', "a comprehension"),
    ('["a" + "b"]', "an operator expression"),
    ('["ab"][0]', "a subscript"),
    ("[str.upper]", "an attribute access"),
    ("(lambda: 1)", "a lambda"),
])
def test_python_bank_rejects_code_in_values(tmp_path, value, what):
    path = _write(tmp_path, "bank.py", f'"""Doc."""\n\nX = {{"cat": {value}}}\n')
    with pytest.raises(BankFormatError) as info:
        load_external_bank(path)
    assert f"{path}:3: the value of X contains {what}" in str(info.value)


@pytest.mark.parametrize("statement,what", [
    ("def f():\n    pass", "a function definition"),
    ("if True:\n    X = {}", "an if statement"),
    ('print("hi")', "an expression statement"),
    ("A = B = {}", "Assign"),
])
def test_python_bank_rejects_statements(tmp_path, statement, what):
    path = _write(tmp_path, "bank.py", f'X = {{"cat": ["a"]}}\n{statement}\n')
    with pytest.raises(BankFormatError, match=f":2: found .*{what}"):
        load_external_bank(path)


def test_python_bank_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "bank.py", 'X = {"cat": ["a"]}\nY = {\n')
    with pytest.raises(BankFormatError, match=r"bank.py:2: not valid Python"):
        load_external_bank(path)


# ============================================================================ check_against, skeleton


def test_check_against_reports_missing_extra_empty_and_close_spellings():
    bank = {"Glioma Tumor": ["s"], "meningioma tumour": ["s"], "pituitary tumor": [], "cat": ["s"]}
    match = check_against(bank, BTMRI)
    assert match.missing == ["glioma tumor", "meningioma tumor", "normal brain"]
    assert match.suggestions == {"glioma tumor": "Glioma Tumor", "meningioma tumor": "meningioma tumour"}
    assert match.empty == ["pituitary tumor"]
    assert match.extra == ["Glioma Tumor", "meningioma tumour", "cat"]
    assert not match.ok
    summary = match.summary()
    assert "missing class 'glioma tumor' (the bank has 'Glioma Tumor': spelling must match)" in summary
    assert "missing class 'normal brain'\n" in summary
    assert "class 'pituitary tumor' has no sentences" in summary
    assert "3 bank entries are not classes" in summary


def test_check_against_a_complete_bank():
    match = check_against(load_bank("btmri"), BTMRI)
    assert match.ok and not match.missing and not match.extra and not match.empty
    assert match.summary() == "every class has descriptions"
    extra = check_against({**load_bank("btmri"), "cat": ["s"]}, BTMRI)
    assert extra.ok and extra.extra == ["cat"] and "1 bank entry is not" in extra.summary()


def test_skeleton_bank():
    skeleton = skeleton_bank(["b", "a", "b"])
    assert skeleton == {"b": [], "a": []} and list(skeleton) == ["b", "a"]
    match = check_against(skeleton, ["a", "b"])
    assert match.empty == ["a", "b"] and not match.ok


def test_load_bank_file_reads_a_name_suffix_only_when_it_names_a_bank(tmp_path):
    from biomedap.prompts import load_bank_file

    two = tmp_path / "two.py"
    two.write_text('A = {"x": ["a"]}\nB = {"x": ["b"]}\n')
    assert load_bank_file(f"{two}:B") == {"x": ["b"]}
    with pytest.raises(BankFormatError, match="several banks"):
        load_bank_file(two)
    odd = tmp_path / "bank.json:v2"  # a real file whose name ends in ':identifier'
    odd.write_text(json.dumps({"x": ["c"]}))
    with pytest.raises(BankFormatError, match="must be .json or .py"):
        load_bank_file(odd)  # the whole name is the path, not PATH:NAME
