"""biomedap.backbone: loading routes, exactness against open_clip, tower adapters, tiny model.

Everything runs offline on the tiny BiomedCLIP-shaped model; Hugging Face caches are fabricated
in tmp dirs (``models--ORG--NAME/refs/main`` + ``snapshots/<rev>/<files>``).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from biomedap.backbone import (
    BIOMEDBERT_HUB_ID,
    BIOMEDCLIP_HUB_ID,
    Backbone,
    BackboneLoadError,
    MissingWeightsError,
    build_tiny_backbone,
    load_backbone,
    save_local_dir,
)

SENTENCES = [
    "a brain mri scan of a meningioma tumor",
    "pituitary tumor",
    "an mri of the brain showing a large irregular glioma tumor with a dark rim and bright center",
    "normal",
]
FAKE_TEXT_REPO = "biomedap-test/tiny-bert"
REV = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- helpers


def pixels(backbone: Backbone, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = backbone.preprocess.size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save_state(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def write_real_format_folder(
    folder: Path, backbone: Backbone, fmt: str, text_name: str = BIOMEDBERT_HUB_ID
) -> Path:
    """A folder as a user gets it from the hub: the config names the hub text model, the checkpoint
    carries BERT's ``position_ids`` buffer, tokenizer files and the BERT config.json sit alongside."""
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(backbone.model_cfg)
    model_cfg["text_cfg"].update(hf_model_name=text_name, hf_tokenizer_name=text_name)
    config = {"model_cfg": model_cfg, "preprocess_cfg": backbone.preprocess.to_dict()}
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    state = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    state["text.transformer.embeddings.position_ids"] = torch.arange(256)[None]
    name = "open_clip_pytorch_model.bin" if fmt == "bin" else "open_clip_model.safetensors"
    save_state(state, folder / name)
    tokenizer = backbone.text.tokenizer
    tokenizer.save_pretrained(folder)
    vocab = [tok for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    backbone.model.text.config.save_pretrained(folder)
    return folder


def fake_cached_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Fabricate ``models--ORG--NAME`` in an HF hub cache with ``files`` (name -> source file)."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REV)
    snapshot = base / "snapshots" / REV
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp, offline. huggingface_hub reads its env vars at import,
    so its constants are patched as well."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def saved_dir(tiny_backbone, tmp_path_factory):
    """The tiny backbone saved as a local-dir folder (safetensors)."""
    return save_local_dir(tiny_backbone, tmp_path_factory.mktemp("tiny_local_dir"))


# --------------------------------------------------------------------------- (a) local-dir round trip


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_local_dir_roundtrip_is_bit_identical(tiny_backbone, tmp_path, fmt):
    folder = save_local_dir(tiny_backbone, tmp_path / "bmc", checkpoint_format=fmt)
    expected_ckpt = "open_clip_model.safetensors" if fmt == "safetensors" else "open_clip_pytorch_model.bin"
    assert (folder / expected_ckpt).is_file() and (folder / "open_clip_config.json").is_file()

    loaded = load_backbone(f"local-dir:{folder}")
    assert loaded.identity.source == "local-dir"
    assert loaded is not tiny_backbone and loaded.model is not tiny_backbone.model
    assert state_dicts_equal(loaded.model, tiny_backbone.model)

    px = pixels(tiny_backbone)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(px), tiny_backbone.encode_image(px))
        assert torch.equal(loaded.encode_text(SENTENCES), tiny_backbone.encode_text(SENTENCES))
    assert torch.equal(loaded.tokenize(SENTENCES).input_ids, tiny_backbone.tokenize(SENTENCES).input_ids)
    assert loaded.identity.fingerprint == tiny_backbone.identity.fingerprint
    assert loaded.identity.weights_sha256 == tiny_backbone.identity.weights_sha256
    assert loaded.preprocess == tiny_backbone.preprocess
    assert loaded.model_cfg == tiny_backbone.model_cfg
    assert float(loaded.logit_scale) == float(tiny_backbone.logit_scale)


def test_fingerprint_depends_on_weights_not_on_spec(tiny_backbone):
    other = build_tiny_backbone(seed=1)
    assert other.identity.fingerprint != tiny_backbone.identity.fingerprint
    assert other.identity.weights_sha256 != tiny_backbone.identity.weights_sha256
    assert other.identity.model_cfg_sha256 == tiny_backbone.identity.model_cfg_sha256
    same = load_backbone("tiny:0")
    assert same.identity.fingerprint == tiny_backbone.identity.fingerprint


# --------------------------------------------------------------------------- (b) exactness vs open_clip


def test_encode_image_equals_open_clip_exactly(tiny_backbone):
    px = pixels(tiny_backbone, batch=4, seed=1)
    with torch.no_grad():
        ours = tiny_backbone.encode_image(px)
        stock = tiny_backbone.model.encode_image(px)
    assert ours.shape == (4, tiny_backbone.embed_dim)
    assert torch.equal(ours, stock)
    normalized = tiny_backbone.encode_image(px, normalize=True)
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(4), atol=1e-6)


def test_text_matches_open_clip_hftokenizer_and_encode_text(tiny_backbone, saved_dir):
    from open_clip.tokenizer import HFTokenizer

    hf_tok = HFTokenizer(str(saved_dir), context_length=256)
    ids256 = hf_tok(SENTENCES)
    assert ids256.shape == (len(SENTENCES), 256)

    tok = tiny_backbone.tokenize(SENTENCES)
    longest = int((ids256 != tiny_backbone.text.pad_id).sum(dim=1).max())
    assert tok.input_ids.shape == (len(SENTENCES), longest) and longest < 256
    assert torch.equal(tok.input_ids, ids256[:, :longest])
    assert torch.equal(tok.attention_mask, (ids256[:, :longest] != 0).long())
    assert (ids256[:, longest:] == tiny_backbone.text.pad_id).all()

    with torch.no_grad():
        via_strings = tiny_backbone.encode_text(SENTENCES)
        via_embeddings = tiny_backbone.encode_text_embeddings(
            tiny_backbone.embed_tokens(tok.input_ids), tok.attention_mask
        )
        stock = tiny_backbone.model.encode_text(ids256)
    assert torch.equal(via_embeddings, via_strings)
    assert torch.allclose(via_strings, stock, atol=1e-5, rtol=0)
    # Non-vacuous: the sentences have distinct features.
    assert not torch.allclose(via_strings[0], via_strings[1], atol=1e-3)
    # Batching does not change the result beyond float rounding.
    batched = tiny_backbone.encode_text(SENTENCES, batch_size=1)
    assert torch.allclose(batched, via_strings, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- (c) padding equivalence


def test_longest_padding_equals_256_padding(tiny_backbone):
    texts = ["normal", "pituitary tumor", SENTENCES[0], SENTENCES[2], "x " * 40]
    tok = tiny_backbone.tokenize(texts)
    lengths = tok.attention_mask.sum(dim=1).tolist()
    assert len(set(lengths)) == len(texts)  # really different lengths
    n, length = tok.input_ids.shape
    assert length == max(lengths) < 256
    ids256 = torch.full((n, 256), tiny_backbone.text.pad_id, dtype=torch.long)
    ids256[:, :length] = tok.input_ids
    mask256 = (ids256 != tiny_backbone.text.pad_id).long()
    assert int(mask256.sum()) == int(tok.attention_mask.sum())
    with torch.no_grad():
        longest = tiny_backbone.encode_text(texts)
        padded = tiny_backbone.encode_text_embeddings(tiny_backbone.embed_tokens(ids256), mask256)
        # Each text alone (no padding at all) gives the same features as well.
        alone = torch.cat([tiny_backbone.encode_text([t]) for t in texts])
    assert torch.allclose(longest, padded, atol=1e-5, rtol=0)
    assert torch.allclose(longest, alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- (d) real-format checkpoint


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_real_format_folder_matches_open_clip(tiny_backbone, tmp_path, fmt):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    folder = write_real_format_folder(tmp_path / "BiomedCLIP", tiny_backbone, fmt)
    ours = load_backbone(f"local-dir:{folder}")
    assert ours.model_cfg["text_cfg"]["hf_model_name"] == BIOMEDBERT_HUB_ID
    assert state_dicts_equal(ours.model, tiny_backbone.model)
    # Where the text config lives is not part of the identity.
    assert ours.identity.fingerprint == tiny_backbone.identity.fingerprint

    text_cfg = {**ours.model_cfg["text_cfg"], "hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                "hf_model_pretrained": False}
    stock = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg, pretrained_text=False).eval()
    assert state_dicts_equal(stock, tiny_backbone.model)  # open_clip loaded the same checkpoint

    px = pixels(tiny_backbone, batch=2, seed=2)
    ids256 = HFTokenizer(str(folder), context_length=256)(SENTENCES)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(px), stock.encode_image(px))
        assert torch.equal(ours.model.encode_text(ids256), stock.encode_text(ids256))
        assert torch.allclose(ours.encode_text(SENTENCES), stock.encode_text(ids256), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- (e) offline HF cache


@pytest.mark.parametrize("how", ["env", "cache_dir", "alias"])
def test_offline_hf_cache_loads(tiny_backbone, tmp_path, hf_cache, monkeypatch, how):
    import huggingface_hub.constants as hf_constants

    src = write_real_format_folder(tmp_path / "src", tiny_backbone, "bin", text_name=FAKE_TEXT_REPO)
    fake_cached_repo(hf_cache, BIOMEDCLIP_HUB_ID, {
        name: src / name
        for name in ("open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt")
    })
    fake_cached_repo(hf_cache, FAKE_TEXT_REPO, {"config.json": src / "config.json"})

    if how == "cache_dir":
        # An explicit cache_dir must be honoured without the process-wide default pointing there.
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
        loaded = load_backbone(f"hf-hub:{BIOMEDCLIP_HUB_ID}", cache_dir=hf_cache)
    elif how == "alias":
        loaded = load_backbone("biomedclip")
    else:
        loaded = load_backbone(f"hf-hub:{BIOMEDCLIP_HUB_ID}")

    assert loaded.identity.source == "hf-hub"
    assert state_dicts_equal(loaded.model, tiny_backbone.model)
    assert loaded.identity.fingerprint == tiny_backbone.identity.fingerprint
    px = pixels(tiny_backbone, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(px), tiny_backbone.encode_image(px))
        assert torch.equal(loaded.encode_text(SENTENCES), tiny_backbone.encode_text(SENTENCES))


# --------------------------------------------------------------------------- (f) missing weights


def test_missing_biomedclip_offline_fails_fast_with_instructions(hf_cache):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        load_backbone("biomedclip")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    needed_parts = ("open_clip_config.json", "open_clip_pytorch_model.bin", BIOMEDCLIP_HUB_ID,
                    BIOMEDBERT_HUB_ID, "local-dir:")
    for needed in needed_parts:
        assert needed in message, needed
    # Where to put the files, and a download command that exists in the pinned huggingface_hub.
    assert str(hf_cache) in message
    assert f"hf download {BIOMEDCLIP_HUB_ID}" in message
    assert isinstance(info.value, FileNotFoundError)


def test_biomedbert_text_config_not_needed_offline(tmp_path, hf_cache):
    """BiomedBERT's config.json is optional: its architecture (BertConfig defaults) is known."""
    from transformers import AutoConfig

    from biomedap.backbone.loading import _resolve_text_config_dir

    folder, scratch = tmp_path / "bmc", tmp_path / "scratch"
    folder.mkdir()
    found = _resolve_text_config_dir(folder, BIOMEDBERT_HUB_ID, None, scratch)
    config = AutoConfig.from_pretrained(str(found))
    shape = (config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers)
    assert shape == ("bert", 30522, 768, 12)
    assert (config.max_position_embeddings, config.pad_token_id) == (512, 0)
    with pytest.raises(MissingWeightsError, match=FAKE_TEXT_REPO):  # an unknown text model is not guessed
        _resolve_text_config_dir(folder, FAKE_TEXT_REPO, None, tmp_path / "scratch2")


def test_missing_unknown_hub_repo_names_it(hf_cache):
    with pytest.raises(MissingWeightsError, match="biomedap-test/not-cached"):
        load_backbone("hf-hub:biomedap-test/not-cached")


@pytest.mark.parametrize("case", ["no-checkpoint", "no-config", "no-tokenizer", "nonexistent"])
def test_missing_local_dir_files_name_the_folder(saved_dir, tmp_path, hf_cache, case):
    folder = tmp_path / "incomplete"
    if case != "nonexistent":
        shutil.copytree(saved_dir, folder)
    if case == "no-checkpoint":
        (folder / "open_clip_model.safetensors").unlink()
    elif case == "no-config":
        (folder / "open_clip_config.json").unlink()
    elif case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        load_backbone(f"local-dir:{folder}")
    assert time.perf_counter() - start < 5
    assert str(folder) in str(info.value)
    if case == "no-config":
        assert "open_clip_config.json" in str(info.value)


# --------------------------------------------------------------------------- (g) bad checkpoints


def _rewrite_checkpoint(saved_dir: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file

    folder = tmp_path / "edited"
    shutil.copytree(saved_dir, folder)
    ckpt = folder / "open_clip_model.safetensors"
    state = load_file(str(ckpt))
    edit(state)
    ckpt.unlink()
    save_state(state, ckpt)
    return folder


def test_wrong_key_raises_load_error_naming_it(saved_dir, tmp_path):
    key = "visual.trunk.blocks.2.mlp.fc1.weight"

    def rename(state):
        state[key + "_renamed"] = state.pop(key)

    folder = _rewrite_checkpoint(saved_dir, tmp_path, rename)
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(f"local-dir:{folder}")
    assert key in str(info.value) and key + "_renamed" in str(info.value)


def test_wrong_shape_raises_load_error_naming_it(saved_dir, tmp_path):
    key = "text.proj.0.weight"

    def reshape(state):
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])

    folder = _rewrite_checkpoint(saved_dir, tmp_path, reshape)
    with pytest.raises(BackboneLoadError, match=key.replace(".", r"\.")):
        load_backbone(f"local-dir:{folder}")


def test_wrapped_and_prefixed_bin_checkpoint_loads(tiny_backbone, saved_dir, tmp_path):
    """Training-script exports ({'state_dict': {'module.' + key: ...}}) load unchanged."""
    folder = tmp_path / "wrapped"
    shutil.copytree(saved_dir, folder)
    (folder / "open_clip_model.safetensors").unlink()
    state = {f"module.{k}": v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, folder / "open_clip_pytorch_model.bin")
    loaded = load_backbone(f"local-dir:{folder}")
    assert state_dicts_equal(loaded.model, tiny_backbone.model)


# --------------------------------------------------------------------------- (h) vision API


def test_block_hook_called_once_per_block_in_order(tiny_backbone):
    depth = tiny_backbone.vision.depth
    px = pixels(tiny_backbone, batch=2)
    calls = []

    def record(index, tokens):
        calls.append((index, tuple(tokens.shape)))
        return tokens

    with torch.no_grad():
        plain = tiny_backbone.encode_image(px)
        hooked = tiny_backbone.encode_image(px, hook=record)
    n_tokens = tiny_backbone.vision.num_tokens
    assert calls == [(i, (2, n_tokens, tiny_backbone.vision.width)) for i in range(depth)]
    assert torch.equal(plain, hooked)

    calls.clear()
    with torch.no_grad():
        prefix = tiny_backbone.encode_image_prefix(px, upto=3)
        tiny_backbone.encode_image(tokens=prefix, start_block=3, hook=record)
    assert [i for i, _ in calls] == list(range(3, depth))

    # The hook's return value is what the block receives.
    def perturb(index, tokens):
        return tokens * 1.5 if index == 2 else tokens

    with torch.no_grad():
        assert not torch.allclose(tiny_backbone.encode_image(px, hook=perturb), plain, atol=1e-4)


def _manual_features(backbone: Backbone, px: torch.Tensor, prompts: dict, pool: str = "cls") -> torch.Tensor:
    """Reference VPT-deep forward written against timm's trunk directly."""
    trunk = backbone.vision.trunk
    prefix = trunk.num_prefix_tokens
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(px))))
    n_extra = 0
    for index, block in enumerate(trunk.blocks):
        if index in prompts:
            p = prompts[index].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :prefix], p, x[:, prefix + n_extra:]], dim=1)
            n_extra = p.shape[1]
        x = block(x)
    x = trunk.norm(x)
    if pool == "cls":
        pooled = x[:, 0]
    elif pool == "avg":
        pooled = x[:, prefix + n_extra:].mean(dim=1)
    else:  # "avg-with-prompts": the bug the adapter must not have
        pooled = x[:, prefix:].mean(dim=1)
    return backbone.model.visual.head(trunk.fc_norm(pooled))


def test_deep_prompts_insert_then_replace(tiny_backbone):
    width = tiny_backbone.vision.width
    gen = torch.Generator().manual_seed(3)
    p0, p3 = torch.randn(2, width, generator=gen), torch.randn(3, width, generator=gen)
    px = pixels(tiny_backbone, batch=2)
    seen = {}

    def observe(index, tokens):
        seen[index] = tokens.clone()
        return tokens

    with torch.no_grad():
        plain = tiny_backbone.encode_image(px)
        deep = tiny_backbone.encode_image(px, prompts={0: p0, 3: p3}, hook=observe)
        shallow = tiny_backbone.encode_image(px, prompts={0: p0})
        reference = _manual_features(tiny_backbone, px, {0: p0, 3: p3})
    assert not torch.allclose(deep, plain, atol=1e-4)
    assert not torch.allclose(deep, shallow, atol=1e-4)  # the block-3 prompts replaced the old ones
    assert torch.allclose(deep, reference, atol=1e-6, rtol=0)

    # The hook runs after the prompts were placed: right after CLS, replaced (not appended) at block 3.
    n = tiny_backbone.vision.num_tokens
    assert [seen[i].shape[1] for i in range(tiny_backbone.vision.depth)] == [n + 2] * 3 + [n + 3] * 3
    assert torch.equal(seen[0][:, 1:3], p0.expand(2, -1, -1))
    assert torch.equal(seen[3][:, 1:4], p3.expand(2, -1, -1))
    assert not torch.allclose(seen[1][:, 1:3], p0.expand(2, -1, -1))


def test_prompt_tokens_never_enter_pooling(tiny_backbone):
    model = copy.deepcopy(tiny_backbone.model)
    model.visual.trunk.global_pool = "avg"
    avg = Backbone(model, tiny_backbone.text.tokenizer, model_cfg=tiny_backbone.model_cfg,
                   preprocess=tiny_backbone.preprocess, identity=tiny_backbone.identity)
    assert tiny_backbone.vision.trunk.global_pool == "token"  # the shared model is untouched
    width = avg.vision.width
    gen = torch.Generator().manual_seed(4)
    prompts = {0: torch.randn(4, width, generator=gen), 2: torch.randn(4, width, generator=gen)}
    px = pixels(avg, batch=2)
    with torch.no_grad():
        # The copy really averages the patch tokens now.
        no_prompts = avg.encode_image(px)
        assert torch.allclose(no_prompts, _manual_features(avg, px, {}, pool="avg"), atol=1e-6, rtol=0)
        assert not torch.allclose(no_prompts, tiny_backbone.encode_image(px), atol=1e-4)
        features = avg.encode_image(px, prompts=prompts)
        expected = _manual_features(avg, px, prompts, pool="avg")
        # Non-vacuous: averaging the prompt tokens in as well would give something else.
        wrong = _manual_features(avg, px, prompts, pool="avg-with-prompts")
    assert torch.allclose(features, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(features, wrong, atol=1e-4)


@pytest.mark.parametrize("k", [0, 3, "depth"])
def test_prefix_then_resume_is_exact(tiny_backbone, k):
    k = tiny_backbone.vision.depth if k == "depth" else k
    px = pixels(tiny_backbone, batch=3, seed=5)
    with torch.no_grad():
        full = tiny_backbone.encode_image(px)
        prefix = tiny_backbone.encode_image_prefix(px, upto=k)
        resumed = tiny_backbone.encode_image(tokens=prefix, start_block=k)
    assert prefix.shape == (3, tiny_backbone.vision.num_tokens, tiny_backbone.vision.width)
    assert torch.equal(resumed, full)
    if k < tiny_backbone.vision.depth:
        # A bare tensor means prompts at start_block: same as inserting them there from pixels.
        p = torch.randn(2, tiny_backbone.vision.width, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            a = tiny_backbone.encode_image(px, prompts={k: p})
            b = tiny_backbone.encode_image(tokens=prefix, start_block=k, prompts=p)
        assert torch.equal(a, b)
        assert not torch.allclose(a, full, atol=1e-4)


def test_prefix_and_start_block_validation(tiny_backbone):
    px = pixels(tiny_backbone, batch=1)
    depth = tiny_backbone.vision.depth
    with pytest.raises(ValueError):
        tiny_backbone.encode_image_prefix(px, upto=depth + 1)
    with pytest.raises(ValueError):
        tiny_backbone.encode_image(px, start_block=2)
    with pytest.raises(ValueError):
        tiny_backbone.encode_image()
    with pytest.raises(ValueError):
        tiny_backbone.encode_image(px, tokens=tiny_backbone.encode_image_prefix(px, 0))


def test_shared_and_per_sample_prompts_agree(tiny_backbone):
    width = tiny_backbone.vision.width
    gen = torch.Generator().manual_seed(6)
    p0, p3 = torch.randn(2, width, generator=gen), torch.randn(2, width, generator=gen)
    px = pixels(tiny_backbone, batch=3)
    with torch.no_grad():
        shared = tiny_backbone.encode_image(px, prompts={0: p0, 3: p3})
        per_sample = tiny_backbone.encode_image(
            px, prompts={0: p0.unsqueeze(0).repeat(3, 1, 1), 3: p3.unsqueeze(0).repeat(3, 1, 1)}
        )
    assert torch.equal(shared, per_sample)


def test_bad_prompts_raise_value_error(tiny_backbone):
    width = tiny_backbone.vision.width
    px = pixels(tiny_backbone, batch=2)
    with pytest.raises(ValueError):
        tiny_backbone.encode_image(px, prompts={0: torch.zeros(2, width + 1)})
    with pytest.raises(ValueError):
        tiny_backbone.encode_image(px, prompts={0: torch.zeros(3, 2, width)})  # batch 3 != 2
    with pytest.raises(ValueError, match="prompts"):
        tiny_backbone.encode_image(px, prompts={tiny_backbone.vision.depth: torch.zeros(2, width)})


def test_validate_block_indices(tiny_backbone):
    assert tiny_backbone.vision.depth == 6
    assert tiny_backbone.validate_block_indices([0, 5], "fusion_layers") == [0, 5]
    with pytest.raises(ValueError) as info:
        tiny_backbone.validate_block_indices([6], "fusion_layers")
    assert "fusion_layers" in str(info.value) and "0..5" in str(info.value)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="deep_layers"):
            tiny_backbone.validate_block_indices([bad], "deep_layers")


def test_gradients_reach_prompts_but_not_backbone(tiny_backbone):
    width = tiny_backbone.vision.width
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(2, width, generator=gen).requires_grad_()
    p3 = torch.randn(2, width, generator=gen).requires_grad_()
    features = tiny_backbone.encode_image(pixels(tiny_backbone, batch=2), prompts={0: p0, 3: p3})
    features.pow(2).sum().backward()
    assert p0.grad is not None and p0.grad.abs().sum() > 0
    assert p3.grad is not None and p3.grad.abs().sum() > 0

    # Text side: learned context vectors in word-embedding space get gradients too.
    tok = tiny_backbone.tokenize(SENTENCES[:2])
    embeds = tiny_backbone.embed_tokens(tok.input_ids).detach().clone().requires_grad_()
    tiny_backbone.encode_text_embeddings(embeds, tok.attention_mask).pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad[:, 1].abs().sum() > 0

    params = list(tiny_backbone.model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------- (i) tiny model


def test_tiny_model_is_big_enough_to_be_meaningful(tiny_backbone):
    import timm

    from biomedap.data.catalog import list_datasets

    assert tiny_backbone.preprocess.size >= 64
    assert tiny_backbone.vision.num_patches >= 16
    assert tiny_backbone.vision.depth >= 6
    assert timm.is_model("biomedap_tiny_vit")
    assert tiny_backbone.model_cfg["vision_cfg"]["timm_model_name"] == "biomedap_tiny_vit"
    assert len(tiny_backbone.text.pieces("meningioma tumor")) >= 3
    assert max(len(tiny_backbone.text.pieces(n)) for n in ("meningioma tumor", "pituitary tumor")) >= 3
    unk = tiny_backbone.text.tokenizer.unk_token_id
    for spec in list_datasets():
        for name in spec.classnames:
            pieces = tiny_backbone.text.pieces(name)
            assert pieces and unk not in pieces, name
    assert tiny_backbone.identity.source == "tiny"


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tiny_backbone):
    with torch.random.fork_rng(devices=[]):  # keep this test's seeding away from other tests
        torch.manual_seed(1234)
        before = torch.get_rng_state().clone()
        first = build_tiny_backbone(seed=0)
        second = build_tiny_backbone(seed=0)
        assert torch.equal(torch.get_rng_state(), before)
    assert state_dicts_equal(first.model, second.model)
    assert state_dicts_equal(first.model, tiny_backbone.model)
    assert first.identity.fingerprint == tiny_backbone.identity.fingerprint


# --------------------------------------------------------------------------- (j) text dropout


def test_text_dropout_toggle_and_context_manager(tiny_backbone):
    model = tiny_backbone.model
    assert not model.text.training
    try:
        with torch.no_grad():
            reference = tiny_backbone.encode_text(SENTENCES)
            tiny_backbone.set_text_dropout(True)
            assert model.text.training and not model.visual.training
            a = tiny_backbone.encode_text(SENTENCES)
            b = tiny_backbone.encode_text(SENTENCES)
            assert not torch.allclose(a, b, atol=1e-4)
            tiny_backbone.set_text_dropout(False)
            assert not model.text.training
            assert torch.equal(tiny_backbone.encode_text(SENTENCES), reference)
            assert torch.equal(tiny_backbone.encode_text(SENTENCES), reference)

        with tiny_backbone.text_dropout(True):
            assert model.text.training
        assert not model.text.training

        tiny_backbone.set_text_dropout(True)
        with tiny_backbone.text_dropout(False):
            assert not model.text.training
        assert model.text.training  # previous mode restored, not simply "off"
        tiny_backbone.set_text_dropout(False)

        with pytest.raises(RuntimeError, match="boom"), tiny_backbone.text_dropout(True):
            raise RuntimeError("boom")
        assert not model.text.training
    finally:
        tiny_backbone.set_text_dropout(False)


def test_tiny_model_registered_with_open_clip_builds_the_same_model(tiny_backbone, tmp_path):
    """open_clip alone (add_model_config + create_model + get_tokenizer) builds the tiny model too."""
    import open_clip

    from biomedap.backbone.tiny import register_tiny_open_clip_config

    name = register_tiny_open_clip_config(tmp_path / "tiny-config")
    assert name in open_clip.list_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock = open_clip.create_model(name, pretrained_hf=False).eval()
    ours = tiny_backbone.model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(value, ours[key]), key
    tokenizer = open_clip.get_tokenizer(name)
    texts = ["a photo of a meningioma tumor.", "normal brain"]
    ids = tokenizer(texts)
    tok = tiny_backbone.tokenize(texts)
    assert torch.equal(ids[:, : tok.input_ids.shape[1]], tok.input_ids)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(stock.encode_image(pixels), tiny_backbone.encode_image(pixels))
