"""Config machinery: coercion, errors, --set parsing, presets and their resolution order, lr schedule."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest

from biomedap.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe_config,
    format_config_help,
    list_presets,
    load_preset,
    load_yaml,
    lr_at,
    merge_dicts,
    parse_set_overrides,
    resolve_run_config,
)


# A method-style config as other modules write them (postponed annotations, help metadata).
@dataclass
class _Inner:
    width: int = field(default=8, metadata={"help": "inner width"})
    gate: float = field(default=0.5, metadata={"help": "gate value"})

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width must be ≥ 1, got {self.width}")


@dataclass
class _Demo:
    n_ctx: int = field(default=4, metadata={"help": "number of context vectors"})
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    flag: bool = field(default=False, metadata={"help": "a switch"})
    name: str = field(default="x", metadata={"help": "a name"})
    maybe: int | None = field(default=None, metadata={"help": "optional int"})
    pair: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "two floats"})
    layers: tuple[int, ...] = field(default=(1,), metadata={"help": "layer indices"})
    items: list[int] = field(default_factory=list, metadata={"help": "list of ints"})
    mode: Literal["a", "b", "none"] = field(default="a", metadata={"help": "mode"})
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "nested"})


# ---------------------------------------------------------------------------------------------- coercion


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("n_ctx", "8", 8),
        ("n_ctx", "1e3", 1000),
        ("n_ctx", 8.0, 8),
        ("lr", "1e-3", 1e-3),
        ("lr", 2, 2.0),
        ("flag", "true", True),
        ("flag", "No", False),
        ("flag", 1, True),
        ("name", 2018, "2018"),
        ("maybe", "none", None),
        ("maybe", "null", None),
        ("maybe", "7", 7),
        ("pair", "0.5,0.6", (0.5, 0.6)),
        ("pair", "(0.5, 0.6)", (0.5, 0.6)),
        ("pair", [0.5, "6e-1"], (0.5, 0.6)),
        ("layers", "[5, 8]", (5, 8)),
        ("layers", "5,8", (5, 8)),
        ("layers", 3, (3,)),
        ("layers", "", ()),
        ("items", "[5, 8]", [5, 8]),
        ("items", (1, "2"), [1, 2]),
        ("mode", "B", "b"),
        ("mode", "none", "none"),
    ],
)
def test_coercion_from_strings_and_yaml_values(key, raw, expected):
    cfg = config_from_dict(_Demo, {key: raw})
    value = getattr(cfg, key)
    assert value == expected
    assert type(value) is type(expected)


def test_nested_dataclass_partial_and_defaults():
    cfg = config_from_dict(_Demo, {"inner": {"gate": "0.25"}, "lr": "0.5"})
    assert cfg.inner == _Inner(width=8, gate=0.25)
    assert cfg.lr == 0.5 and cfg.n_ctx == 4
    assert config_from_dict(_Demo, None) == _Demo()


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"n_ctx": "four"}, ["n_ctx", "int", "'four'"]),
        ({"n_ctx": True}, ["n_ctx", "int", "True"]),
        ({"lr": "fast"}, ["lr", "float", "'fast'"]),
        ({"flag": "maybe"}, ["flag", "bool", "'maybe'"]),
        ({"name": None}, ["name", "str", "None"]),
        ({"pair": "1,2,3"}, ["pair", "tuple[float, float]", "2 items"]),
        ({"layers": "[1, x]"}, ["layers[1]", "int", "'x'"]),
        ({"mode": "c"}, ["mode", "'a', 'b', 'none'", "'c'"]),
        ({"inner": {"width": "wide"}}, ["inner.width", "int", "'wide'"]),
        ({"inner": 3}, ["inner", "_Inner", "3"]),
    ],
)
def test_wrong_types_name_the_dotted_key_the_type_and_the_value(data, needles):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_Demo, data, where="method_config")
    message = str(info.value)
    assert "method_config." in message
    for needle in needles:
        assert needle in message, message


def test_unknown_key_names_dotted_key_and_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        config_from_dict(RunConfig, {"optim": {"lrr": 0.1}})
    message = str(info.value)
    assert "'optim.lrr'" in message
    assert "did you mean 'optim.lr'?" in message
    assert "weight_decay" in message  # lists the valid keys
    pattern = r"'coop\.method_config\.n_ctxx'.*did you mean 'coop\.method_config\.n_ctx'"
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(_Demo, {"n_ctxx": 8}, where="coop.method_config")
    with pytest.raises(ConfigError, match=r"'inner\.widht'.*'inner\.width'"):
        config_from_dict(_Demo, {"inner": {"widht": 2}})
    assert issubclass(ConfigError, ValueError)


def test_post_init_errors_are_prefixed_with_their_location():
    with pytest.raises(ConfigError, match=r"^x\.inner\.width must be ≥ 1"):
        config_from_dict(_Demo, {"inner": {"width": 0}}, where="x")
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0"):
        RunConfig.from_dict({"optim": {"lr": 0}})


@pytest.mark.parametrize(
    ("cls", "data", "needles"),
    [
        (OptimConfig, {"lr": -1}, ["lr", "> 0"]),
        (OptimConfig, {"epochs": 0}, ["epochs", "≥ 1"]),
        (OptimConfig, {"batch_size": 0}, ["batch_size", "≥ 1"]),
        (OptimConfig, {"momentum": 1.0}, ["momentum", "[0, 1)"]),
        (OptimConfig, {"epochs": 3, "warmup_epochs": 3}, ["warmup_epochs", "[0, 3)"]),
        (OptimConfig, {"optimizer": "adam"}, ["optimizer", "'sgd', 'adamw'", "'adam'"]),
        (OptimConfig, {"adam_betas": [0.9, 1.5]}, ["adam_betas", "[0, 1)"]),
        (OptimConfig, {"grad_clip": 0}, ["grad_clip", "> 0"]),
        (OptimConfig, {"schedule_step": "step"}, ["schedule_step", "'epoch', 'iteration'"]),
        (DataConfig, {"shots": 0}, ["shots", "≥ 1"]),
        (DataConfig, {"views": 0}, ["views", "≥ 1"]),
        (DataConfig, {"augment": "flip"}, ["augment", "'dassl', 'lp', 'none'"]),
        (DataConfig, {"eval_splits": "val,tset"}, ["eval_splits", "'tset'", "train, val, test"]),
        (DataConfig, {"subsample": "new"}, ["subsample", "'all', 'base', 'novel'"]),
        (RunConfig, {"precision": "fp16"}, ["precision", "'auto', 'fp32', 'bf16'", "'fp16'"]),
        (RunConfig, {"eval_batch_size": 0}, ["eval_batch_size", "≥ 1"]),
    ],
)
def test_invalid_values_name_the_option(cls, data, needles):
    with pytest.raises(ConfigError) as info:
        config_from_dict(cls, data)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_direct_construction_coerces_and_validates():
    optim = OptimConfig(lr="1e-3", adam_betas=[0.8, 0.9])
    assert optim.lr == 1e-3 and optim.adam_betas == (0.8, 0.9)
    run = RunConfig(optim={"epochs": "10"}, data={"shots": 4})
    assert isinstance(run.optim, OptimConfig) and run.optim.epochs == 10 and run.data.shots == 4
    with pytest.raises(ConfigError, match="optimizer"):
        OptimConfig(optimizer="lbfgs")
    with pytest.raises(Exception):  # frozen
        run.seed = 3  # type: ignore[misc]
    hash(run)  # frozen configs hash although method_config is a dict


# ---------------------------------------------------------------------------------------------- dicts


def test_round_trip_to_dict_from_dict():
    run = RunConfig(
        method="coop", method_config={"n_ctx": 8, "layers": (5, 8)}, seed=3,
        optim=OptimConfig(optimizer="adamw", adam_betas=(0.8, 0.99), grad_clip=1.0,
                          schedule_step="iteration"),
        data=DataConfig(dataset="btmri", views=10, eval_splits=("val", "test"), split_seed=1),
    )
    plain = run.to_dict()
    assert plain["data"]["eval_splits"] == ["val", "test"]
    assert plain["optim"]["adam_betas"] == [0.8, 0.99]
    assert plain["method_config"]["layers"] == [5, 8]
    # YAML round trip too: what a run directory's config.yaml holds.
    import yaml

    again = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(plain)))
    assert again.optim == run.optim and again.data == run.data and again.seed == 3
    assert again.method_config == {"n_ctx": 8, "layers": [5, 8]}
    assert config_to_dict(config_from_dict(_Demo, config_to_dict(_Demo()))) == config_to_dict(_Demo())
    custom = _Demo(layers=(2, 3), mode="b", inner=_Inner(width=2))
    assert config_from_dict(_Demo, config_to_dict(custom)) == custom


def test_merge_dicts_is_deep_and_does_not_mutate():
    base = {"optim": {"lr": 1, "epochs": 5}, "tags": [1, 2], "seed": 1}
    override = {"optim": {"lr": 2}, "tags": [3], "new": {"a": 1}}
    merged = merge_dicts(base, override)
    assert merged == {"optim": {"lr": 2, "epochs": 5}, "tags": [3], "seed": 1, "new": {"a": 1}}
    assert base == {"optim": {"lr": 1, "epochs": 5}, "tags": [1, 2], "seed": 1}
    merged["new"]["a"] = 9
    assert override["new"]["a"] == 1


def test_parse_set_overrides():
    parsed = parse_set_overrides([
        "optim.lr=0.01", "method.n_ctx=8", "method.fusion_layers=[5,8]", "data.views=none",
        "method.text_dropout=true", "method.ctx_init=a photo of a", "optim.batch-size=64", "seed=2", "seed=3",
        "data.root=",
    ])
    assert parsed == {
        "optim": {"lr": 0.01, "batch_size": 64},
        "method": {"n_ctx": 8, "fusion_layers": [5, 8], "text_dropout": True, "ctx_init": "a photo of a"},
        "data": {"views": "none", "root": None},
        "seed": 3,
    }
    aliased = parse_set_overrides(["method=coop", "method.n_ctx=8"], aliases={"method": "method_config"})
    assert aliased == {"method": "coop", "method_config": {"n_ctx": 8}}


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=1", ".lr=2", "optim.=1"])
def test_parse_set_overrides_rejects_malformed_items(item):
    with pytest.raises(ConfigError) as info:
        parse_set_overrides([item])
    assert repr(item) in str(info.value)


def test_parse_set_overrides_rejects_value_and_subkey_conflict():
    with pytest.raises(ConfigError, match="'optim'"):
        parse_set_overrides(["optim=1", "optim.lr=0.1"])


def test_load_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_yaml(bad)
    scalar = tmp_path / "list.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_yaml(scalar)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


# ---------------------------------------------------------------------------------------------- help


def test_describe_config_lists_nested_fields_with_help():
    rows = {row[0]: row for row in describe_config(RunConfig)}
    assert rows["optim.lr"] == ("optim.lr", "float", "0.002", rows["optim.lr"][3])
    assert "learning rate" in rows["optim.lr"][3]
    assert rows["data.eval_splits"][1:3] == ("tuple[str, ...]", '["test"]')
    assert rows["optim.optimizer"][1] == "{sgd,adamw}"
    assert rows["optim.grad_clip"][1:3] == ("float | None", "null")
    assert "optim" not in rows and "data" not in rows  # groups are expanded, not listed
    assert all(row[3] for row in rows.values()), "every option has help text"

    demo = {row[0]: row for row in describe_config(_Demo, prefix="method.")}
    assert demo["method.inner.width"][1:] == ("int", "8", "inner width")
    assert [r[0] for r in describe_config(_Demo(n_ctx=16), prefix="m.") if r[0] == "m.n_ctx"] == ["m.n_ctx"]
    assert dict((r[0], r[2]) for r in describe_config(_Demo(n_ctx=16)))["n_ctx"] == "16"

    table = format_config_help(_Demo, prefix="method.")
    lines = table.splitlines()
    assert lines[0].split() == ["option", "type", "default", "help"]
    assert any(line.startswith("method.inner.gate") and "gate value" in line for line in lines)
    # aligned: the type column starts at the same offset on every line
    offsets = {line.index(line.split()[1], len(line.split()[0])) for line in lines}
    assert len(offsets) == 1


# ---------------------------------------------------------------------------------------------- lr schedule


def test_lr_at_dassl_per_epoch_literal_values():
    optim = OptimConfig()  # lr 0.002, 100 epochs, 1 warm-up epoch at 1e-5
    assert lr_at(optim, 0) == 1e-5
    assert lr_at(optim, 1) == pytest.approx(0.002, abs=0, rel=1e-15)
    assert lr_at(optim, 2) == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi / 100)), rel=1e-15)
    assert lr_at(optim, 99) == pytest.approx(0.002 * 0.5 * (1 + math.cos(98 * math.pi / 100)), rel=1e-15)
    assert lr_at(optim, 99) > 0  # the published schedule never reaches zero
    assert lr_at(optim, 5, step_in_epoch=3, steps_per_epoch=4) == lr_at(optim, 5)  # per epoch: steps ignored
    const = OptimConfig(schedule="constant", warmup_epochs=2, warmup_lr=1e-4, epochs=10)
    assert [lr_at(const, e) for e in (0, 1, 2, 9)] == [1e-4, 1e-4, 0.002, 0.002]


def test_lr_at_iteration_level():
    optim = OptimConfig(schedule_step="iteration", lr=0.01, epochs=20, warmup_epochs=1)
    steps = 3  # T = 60 iterations, warm-up = 3 iterations
    assert [lr_at(optim, 0, s, steps) for s in range(3)] == [1e-5] * 3
    assert lr_at(optim, 1, 0, steps) == pytest.approx(0.01)
    assert lr_at(optim, 1, 1, steps) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 1 / 60)))
    assert lr_at(optim, 19, 2, steps) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 56 / 60)))
    # No warm-up: PyTorch's CosineAnnealingLR over all iterations (Tip-Adapter-F).
    cos = OptimConfig(schedule_step="iteration", optimizer="adamw", lr=0.001, epochs=20, warmup_epochs=0)
    assert lr_at(cos, 0, 0, 4) == pytest.approx(0.001)
    assert lr_at(cos, 10, 0, 4) == pytest.approx(0.0005)
    with pytest.raises(ValueError, match="step_in_epoch"):
        lr_at(optim, 0, 3, steps)


# ---------------------------------------------------------------------------------------------- presets


@pytest.fixture
def presets(tmp_path):
    root = tmp_path / "presets"
    root.mkdir()
    (root / "demo.yaml").write_text(textwrap.dedent("""\
        # demo preset
        method_config: {n_ctx: 4, ctx_init: "a photo of a"}
        optim: {lr: 0.002, epochs: 100, batch_size: 32}
        data: {augment: dassl}
        datasets:
          btmri: {method_config: {n_ctx: 6}, optim: {epochs: 50}}
          covid: {optim: {batch_size: 8}}
          Kvasir: {seed: 7}
        """))
    (root / "other_method.yaml").write_text("optim: {lr: 0.1}\n")
    return root


def test_load_preset_and_dataset_table(presets):
    plain = load_preset("demo", presets_dir=presets)
    assert "datasets" not in plain
    assert plain["method_config"] == {"n_ctx": 4, "ctx_init": "a photo of a"}
    for name in ("btmri", "BTMRI", "/data/BTMRI"):
        merged = load_preset("demo", name, presets_dir=presets)
        assert merged["method_config"] == {"n_ctx": 6, "ctx_init": "a photo of a"}
        assert merged["optim"] == {"lr": 0.002, "epochs": 50, "batch_size": 32}
    assert load_preset("demo", "kvasir", presets_dir=presets)["seed"] == 7  # table key in another case
    assert load_preset("demo", "COVID_19", presets_dir=presets)["optim"]["batch_size"] == 8  # name -> key
    assert load_preset("demo", "busi", presets_dir=presets) == plain
    assert load_preset("Other-Method", presets_dir=presets)["optim"] == {"lr": 0.1}
    with pytest.raises(ConfigError) as info:
        load_preset("dmeo", presets_dir=presets)
    assert "demo, other_method" in str(info.value) and "Did you mean 'demo'" in str(info.value)


def test_resolve_order_preset_dataset_table_file_set(presets, tmp_path):
    run = resolve_run_config("demo", presets_dir=presets)
    assert run.method == "demo"
    assert run.method_config == {"n_ctx": 4, "ctx_init": "a photo of a"}
    assert run.optim.epochs == 100 and run.optim.momentum == 0.9

    run = resolve_run_config("demo", dataset="btmri", presets_dir=presets)
    assert run.method_config["n_ctx"] == 6 and run.optim.epochs == 50  # dataset table > preset

    config_file = tmp_path / "my.yaml"
    config_file.write_text("method: {n_ctx: 10}\noptim: {epochs: 20, lr: 1e-3}\ndata: {dataset: btmri}\n")
    run = resolve_run_config("demo", config_file=config_file, presets_dir=presets)
    assert run.method_config["n_ctx"] == 10 and run.optim.epochs == 20  # file > dataset table
    assert run.optim.lr == 1e-3 and run.data.dataset == "btmri"

    run = resolve_run_config("demo", config_file=config_file, overrides=["method.n_ctx=12", "optim.lr=0.5"],
                             presets_dir=presets)
    assert run.method_config == {"n_ctx": 12, "ctx_init": "a photo of a"}  # --set > file
    assert run.optim.lr == 0.5 and run.optim.epochs == 20

    run = resolve_run_config("demo", base={"seed": 4, "optim": {"epochs": 30}}, config_file=config_file,
                             presets_dir=presets)
    assert run.seed == 4 and run.optim.epochs == 20  # base < file


def test_dataset_from_set_selects_the_table_entry(presets):
    run = resolve_run_config("demo", overrides=["data.dataset=BTMRI"], presets_dir=presets)
    assert run.data.dataset == "BTMRI" and run.method_config["n_ctx"] == 6 and run.optim.epochs == 50
    # --set beats the dataset argument, and its table entry is the one applied.
    run = resolve_run_config("demo", dataset="btmri", overrides=["data.dataset=covid"], presets_dir=presets)
    assert run.data.dataset == "covid" and run.optim.batch_size == 8 and run.optim.epochs == 100


def test_resolve_errors_name_the_source(presets, tmp_path):
    with pytest.raises(ConfigError, match=r"--set: unknown option 'optim\.lrr'; did you mean 'optim\.lr'"):
        resolve_run_config("demo", overrides=["optim.lrr=1"], presets_dir=presets)
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("dataa: {shots: 4}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown option 'dataa'; did you mean 'data'"):
        resolve_run_config("demo", config_file=config_file, presets_dir=presets)
    with pytest.raises(ConfigError, match="optim.epochs"):
        resolve_run_config("demo", overrides=["optim.epochs=ten"], presets_dir=presets)
    with pytest.raises(ConfigError, match="method"):
        resolve_run_config("demo", overrides=["method=other_method"], presets_dir=presets)
    with pytest.raises(ConfigError, match="available presets"):
        resolve_run_config("nope", presets_dir=presets)
    assert resolve_run_config(None, overrides=["method=other_method"], presets_dir=presets).optim.lr == 0.1


def test_packaged_presets_resolve_and_fit_their_method_configs():
    assert {"coop", "zeroshot"} <= set(list_presets())
    run = resolve_run_config("coop", dataset="btmri")
    assert run.method_config == {
        "text_dropout": False, "n_ctx": 4, "ctx_init": "a photo of a", "csc": False, "class_token_position": "end"}
    # The OptimConfig defaults are CoOp's Dassl settings, and the preset states them all.
    assert config_to_dict(run.optim) == config_to_dict(OptimConfig())
    assert run.data.augment == "dassl" and run.precision == "fp32"
    zs = resolve_run_config("zeroshot")
    assert zs.method_config == {"text_dropout": False, "templates": ["a photo of a {}."]}
    assert zs.data.augment == "none"

    methods = pytest.importorskip("biomedap.methods")
    coop = config_from_dict(methods.get_method("coop").Config, run.method_config, where="method_config")
    assert (coop.n_ctx, coop.ctx_init, coop.csc, coop.class_token_position) == (
        4, "a photo of a", False, "end")
    zeroshot = config_from_dict(methods.get_method("zeroshot").Config, zs.method_config)
    assert zeroshot.templates == ("a photo of a {}.",)


def test_import_is_light():
    code = "import sys, biomedap.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_released_clip_adapter_schedule_period_and_iteration_warmup():
    """Dassl's wrapper stepped per iteration with T_max = 20: iteration 0 at 1e-5, then a cosine of period 20."""
    optim = OptimConfig(lr=0.01, epochs=20, schedule_step="iteration", warmup_epochs=0, warmup_iterations=1,
                        cosine_period=20, warmup_lr=1e-5)
    lrs = [lr_at(optim, e, s, 2) for e in range(20) for s in range(2)]
    assert lrs[0] == 1e-5
    for k in range(1, 40):
        assert lrs[k] == pytest.approx(0.005 * (1 + math.cos(math.pi * (k - 1) / 20)))
    assert lrs[21] == pytest.approx(0.0) and lrs[39] > 0.009  # decays to 0 at k = 21, then rises again


def test_schedule_extension_fields_are_validated():
    with pytest.raises(ConfigError, match="cosine_period"):
        OptimConfig(cosine_period=0)
    with pytest.raises(ConfigError, match="warmup_iterations"):
        OptimConfig(warmup_iterations=-1)


def test_preset_variant_table_is_applied_under_the_dataset_table(tmp_path):
    root = tmp_path / "presets"
    root.mkdir()
    (root / "adapter.yaml").write_text(textwrap.dedent("""\
        method_config: {ratio: 0.2, renormalize: true}
        optim: {lr: 0.002, momentum: 0.9, epochs: 20}
        variants:
          released: {method_config: {ratio: 0.5, renormalize: false}, optim: {lr: 0.01, momentum: 0.0}}
        datasets:
          btmri: {optim: {epochs: 7}}
        """))
    paper = resolve_run_config("adapter", presets_dir=root)
    assert paper.method_config == {"ratio": 0.2, "renormalize": True} and paper.optim.momentum == 0.9
    released = resolve_run_config("adapter", overrides=["method.variant=released", "data.dataset=btmri"],
                                  presets_dir=root)
    assert released.method_config == {"ratio": 0.5, "renormalize": False, "variant": "released"}
    assert released.optim.lr == 0.01 and released.optim.momentum == 0.0 and released.optim.epochs == 7
    explicit = resolve_run_config("adapter", overrides=["method.variant=released", "optim.lr=0.5"],
                                  presets_dir=root)
    assert explicit.optim.lr == 0.5  # --set still wins over the variant table


def test_base_to_novel_protocol_table_applies_when_training_on_base_classes(tmp_path):
    (tmp_path / "demo.yaml").write_text(
        "optim: {epochs: 100, lr: 0.01}\n"
        "method_config: {}\n"
        "datasets:\n  btmri: {seed: 3}\n  busi: {seed: 4}\n"
        "protocols:\n  base2novel:\n    optim: {epochs: 50}\n    datasets:\n      btmri: {seed: 9}\n"
    )
    few_shot = resolve_run_config("demo", dataset="btmri", presets_dir=tmp_path)
    assert (few_shot.optim.epochs, few_shot.seed) == (100, 3)
    b2n = resolve_run_config("demo", dataset="btmri", overrides=["data.subsample=base"], presets_dir=tmp_path)
    assert (b2n.optim.epochs, b2n.optim.lr, b2n.seed) == (50, 0.01, 9)
    # the protocol's table replaces the few-shot table: busi's few-shot seed does not leak into b2n
    busi = resolve_run_config("demo", dataset="busi", overrides=["data.subsample=base"], presets_dir=tmp_path)
    assert busi.seed == RunConfig().seed
    # --set still wins over the protocol table
    forced = resolve_run_config("demo", dataset="btmri", overrides=["data.subsample=base", "optim.epochs=7"],
                                presets_dir=tmp_path)
    assert forced.optim.epochs == 7
    (tmp_path / "bad.yaml").write_text("protocols:\n  fewshot: {}\n")
    with pytest.raises(ConfigError, match="protocols"):
        resolve_run_config("bad", presets_dir=tmp_path)


@pytest.mark.parametrize("method, epochs, lr, option, value", [
    ("coop", 50, 0.002, None, None),
    ("kgcoop", 50, 0.002, "kg_weight", 8.0),       # W = 8 on every dataset (btmri's few-shot W is 2)
    ("prograd", 50, 0.0015, "temperature", 1.0),   # T = 1 on every dataset (btmri's few-shot T is 2)
])
def test_published_base_to_novel_settings_of_the_coop_family(method, epochs, lr, option, value):
    run = resolve_run_config(method, dataset="btmri", overrides=["data.subsample=base"])
    assert (run.optim.epochs, run.optim.lr) == (epochs, lr)
    if option:
        assert run.method_config[option] == value


def test_medmnist_keys_do_not_pick_up_the_benchmark_entry_of_the_same_flag(tmp_path):
    (tmp_path / "demo.yaml").write_text("datasets:\n  octmnist: {seed: 5}\n  medmnist/pathmnist: {seed: 6}\n")
    assert resolve_run_config("demo", dataset="octmnist", presets_dir=tmp_path).seed == 5
    assert resolve_run_config("demo", dataset="OCTMNIST", presets_dir=tmp_path).seed == 5
    assert resolve_run_config("demo", dataset="medmnist/octmnist", presets_dir=tmp_path).seed == RunConfig().seed
    assert resolve_run_config("demo", dataset="medmnist-pathmnist", presets_dir=tmp_path).seed == 6
    assert resolve_run_config("demo", dataset="/data/OCTMNIST", presets_dir=tmp_path).seed == 5  # a folder
