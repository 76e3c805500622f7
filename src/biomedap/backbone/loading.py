"""Loading backbones: BiomedCLIP from the Hugging Face Hub or its cache, local folders, the tiny model.

Every route ends in :func:`build_from_folder`, which builds the model with an unmodified
``open_clip.create_model("local-dir:...")`` and loads the checkpoint itself, so a local copy, an
offline Hub cache and the tiny test model all exercise the same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.transforms import PreprocessConfig
from ..io import atomic_save_safetensors, atomic_write_json, json_fingerprint
from .core import Backbone, BackboneIdentity
from .towers import UnsupportedBackboneError

log = logging.getLogger(__name__)

BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
ALIASES = {"biomedclip": f"hf-hub:{BIOMEDCLIP_HUB_ID}"}

# Checkpoint names in the order open_clip prefers them.
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Text towers whose architecture is known, so that a missing config.json of the text model's own
# repository is not fatal offline.  BiomedBERT-base is exactly transformers' BertConfig defaults
# (strict checkpoint loading verifies every shape anyway).
KNOWN_TEXT_CONFIGS = {
    BIOMEDBERT_HUB_ID: {"model_type": "bert"},
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": {"model_type": "bert"},
}


class MissingWeightsError(FileNotFoundError):
    """Model files are not on this machine; the message lists them and where to put them."""


class BackboneLoadError(RuntimeError):
    """Files were found but do not form a loadable model (wrong keys, bad config)."""


def _hub_help(repo_id: str, text_repo: str | None) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    lines = [
        "Needed files:",
        f"  from https://huggingface.co/{repo_id}:",
        "    open_clip_config.json, open_clip_pytorch_model.bin (or open_clip_model.safetensors),",
        "    vocab.txt, tokenizer_config.json (tokenizer.json and special_tokens_map.json if present)",
    ]
    if text_repo:
        optional = " (optional: biomedap knows this architecture)" if text_repo in KNOWN_TEXT_CONFIGS else ""
        lines += [f"  from https://huggingface.co/{text_repo}:", f"    config.json{optional}"]
    lines += [
        "Put them either",
        f"  (a) in the Hugging Face cache ({cache}): on a machine with internet run",
        f"      hf download {repo_id}"
        + (f"\n      hf download {text_repo} config.json vocab.txt" if text_repo else ""),
        "      (huggingface_hub < 0.34 names this command `huggingface-cli download`)",
        "      and copy the cache folder to this machine (same HF_HOME layout); or",
        "  (b) all in one folder, then load it with  --backbone local-dir:/path/to/folder",
        "      (biomedap.load_backbone('local-dir:/path/to/folder')).",
    ]
    return "\n".join(lines)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------- public API


def load_backbone(
    name_or_path: str | os.PathLike = "biomedclip",
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Load a frozen backbone.

    Accepted forms:
        ``"biomedclip"``: alias of ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``;
        ``"hf-hub:ORG/REPO"``: downloaded once, then read from the Hugging Face cache (works
        offline with ``HF_HUB_OFFLINE=1`` when cached);
        ``"local-dir:PATH"`` or an existing folder: ``open_clip_config.json`` + a checkpoint
        (``.safetensors``, ``.bin`` or ``.pth``) + tokenizer files, optionally the text model's
        ``config.json``;
        ``"tiny"`` / ``"tiny:SEED"``: a tiny random BiomedCLIP-shaped model for tests and demos;
        ``"random-biomedclip"`` / ``"random-biomedclip:SEED"``: the full-size architecture with
        random weights (speed and memory benchmarks without the real checkpoint).
    """
    spec = str(name_or_path)
    resolved = ALIASES.get(spec.lower(), spec)
    if resolved == "tiny" or resolved.startswith("tiny:"):
        from .tiny import build_tiny_backbone

        seed = int(resolved.split(":", 1)[1]) if ":" in resolved else 0
        return build_tiny_backbone(seed=seed, device=device)
    if resolved == "random-biomedclip" or resolved.startswith("random-biomedclip:"):
        from .tiny import build_random_biomedclip

        seed = int(resolved.split(":", 1)[1]) if ":" in resolved else 0
        return build_random_biomedclip(seed=seed, device=device)
    if resolved.startswith("hf-hub:"):
        repo_id = resolved[len("hf-hub:"):]
        folder, checkpoint = _resolve_hub_files(repo_id, cache_dir)
        return build_from_folder(folder, spec=spec, source="hf-hub", checkpoint=checkpoint,
                                 device=device, cache_dir=cache_dir)
    local = resolved[len("local-dir:"):] if resolved.startswith("local-dir:") else resolved
    if resolved.startswith("local-dir:") or os.path.isdir(local):
        folder = Path(local).expanduser()
        return build_from_folder(folder, spec=spec, source="local-dir", checkpoint=_find_checkpoint(folder),
                                 device=device, cache_dir=cache_dir)
    raise ValueError(
        f"unknown backbone {spec!r}. Use 'biomedclip', 'hf-hub:ORG/REPO', 'local-dir:/path/to/folder' "
        "(a folder with open_clip_config.json and a checkpoint), 'tiny' or 'random-biomedclip'. biomedap supports open_clip "
        "models with a timm ViT image tower and a Hugging Face text tower (the BiomedCLIP layout)."
    )


def save_local_dir(backbone: Backbone, path: str | os.PathLike, *, checkpoint_format: str = "safetensors") -> Path:
    """Write ``backbone`` as a self-contained ``local-dir:`` folder (config, weights, tokenizer, text config)."""
    if checkpoint_format not in ("safetensors", "bin"):
        raise ValueError(f"checkpoint_format must be 'safetensors' or 'bin', got {checkpoint_format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path / "open_clip_config.json",
        {"model_cfg": backbone.model_cfg, "preprocess_cfg": backbone.preprocess.to_dict()},
    )
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    if checkpoint_format == "safetensors":
        atomic_save_safetensors(path / "open_clip_model.safetensors", state)
    else:
        target = path / "open_clip_pytorch_model.bin"
        with tempfile.NamedTemporaryFile(dir=path, delete=False, suffix=".tmp") as handle:
            tmp = Path(handle.name)
        try:
            torch.save(state, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    backbone.text.tokenizer.save_pretrained(path)
    backbone.model.text.config.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- resolution


def _find_checkpoint(folder: Path) -> Path:
    if not folder.is_dir():
        raise MissingWeightsError(f"backbone folder not found: {folder}\n" + _folder_help(folder))
    if not (folder / "open_clip_config.json").is_file():
        raise MissingWeightsError(f"{folder} has no open_clip_config.json\n" + _folder_help(folder))
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
    if others:
        return others[0]
    raise MissingWeightsError(f"{folder} has no checkpoint (*.safetensors, *.bin or *.pth)\n" + _folder_help(folder))


def _folder_help(folder: Path) -> str:
    return (
        f"A local-dir backbone folder needs: open_clip_config.json, a checkpoint "
        f"({', '.join(CHECKPOINT_NAMES[:3])}), tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) and, "
        "unless the text model is BiomedBERT, the text model's config.json.\n"
        f"For BiomedCLIP:\n{_hub_help(BIOMEDCLIP_HUB_ID, BIOMEDBERT_HUB_ID)}"
    )


def _resolve_hub_files(repo_id: str, cache_dir) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    text_repo = BIOMEDBERT_HUB_ID if repo_id == BIOMEDCLIP_HUB_ID else None
    try:
        config_path = Path(hf_hub_download(repo_id, "open_clip_config.json", cache_dir=cache_dir))
    except Exception as err:  # offline, no network, unknown repo: all mean "not on this machine"
        state = "offline (HF_HUB_OFFLINE=1)" if _offline() else "not in the cache and the Hub could not be reached"
        raise MissingWeightsError(
            f"backbone 'hf-hub:{repo_id}' is {state} ({type(err).__name__}).\n" + _hub_help(repo_id, text_repo)
        ) from err
    checkpoint = None
    for name in CHECKPOINT_NAMES:
        try:
            checkpoint = Path(hf_hub_download(repo_id, name, cache_dir=cache_dir))
            break
        except Exception:
            continue
    if checkpoint is None:
        raise MissingWeightsError(
            f"backbone 'hf-hub:{repo_id}': config found but no checkpoint in the cache.\n" + _hub_help(repo_id, text_repo)
        )
    for name in TOKENIZER_FILES:  # optional files: fetched when present, ignored when absent
        with contextlib.suppress(Exception):
            hf_hub_download(repo_id, name, cache_dir=cache_dir)
    return config_path.parent, checkpoint


def _cached_repo_file(repo_id: str, filename: str, cache_dir) -> Path | None:
    """A file of a Hub repo from the local cache only (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except Exception:  # not a valid repo id (e.g. a plain folder name)
        return None
    return Path(found) if isinstance(found, str) else None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()


def _resolve_text_config_dir(folder: Path, text_name: str, cache_dir, scratch: Path) -> Path:
    """Where ``AutoConfig`` finds the text model's config.json, without touching the network."""
    candidate = Path(text_name).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    if (folder / "config.json").is_file():
        return folder
    cached = _cached_repo_file(text_name, "config.json", cache_dir)
    if cached is not None:
        return cached.parent
    if text_name in KNOWN_TEXT_CONFIGS:
        from transformers import BertConfig

        BertConfig(pad_token_id=0).save_pretrained(scratch)
        return scratch
    if not _offline():
        with contextlib.suppress(Exception):
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(text_name, "config.json", cache_dir=cache_dir)).parent
    raise MissingWeightsError(
        f"the text model config for {text_name!r} was not found: put its config.json in {folder} "
        "or in the Hugging Face cache."
    )


def _resolve_tokenizer_dir(folder: Path, text_dir: Path, tokenizer_name: str, cache_dir) -> Path:
    for candidate in (folder, text_dir, Path(tokenizer_name).expanduser()):
        if _has_tokenizer(candidate):
            return candidate
    for name in ("tokenizer.json", "vocab.txt"):
        cached = _cached_repo_file(tokenizer_name, name, cache_dir)
        if cached is not None:
            return cached.parent
    raise MissingWeightsError(
        f"no tokenizer files (vocab.txt or tokenizer.json) in {folder} or in the cache of {tokenizer_name!r}.\n"
        + _folder_help(folder)
    )


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError):
        # A bare vocab.txt without tokenizer_config.json: AutoTokenizer cannot tell the class.
        return BertTokenizerFast.from_pretrained(str(folder))


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warnings about random init: we load the weights ourselves."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not any(part in message for part in ("pretrained weights", "initialized", "no CLIP weights"))

    root = logging.getLogger()
    flt = _Drop()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


# ---------------------------------------------------------------------------- building


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, safely: safetensors, or ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneLoadError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneLoadError(f"checkpoint {path} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    # Keys the real BiomedCLIP checkpoints carry that current transformers no longer has:
    # the non-persistent position_ids buffer and, in older exports, BERT's unused pooler.
    for key in list(state):
        if key not in expected and (key.endswith("embeddings.position_ids") or ".transformer.pooler." in key):
            state.pop(key)
    if "logit_scale" in state and state["logit_scale"].shape != expected["logit_scale"].shape:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"{label}: {show(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)) if keys]
        raise BackboneLoadError(f"checkpoint {path} does not match its open_clip_config.json; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def state_dict_sha256(model: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_from_folder(
    folder: Path,
    *,
    spec: str,
    source: str,
    checkpoint: Path | None,
    device: str | torch.device = "cpu",
    cache_dir=None,
    init_seed: int | None = None,
) -> Backbone:
    """Build the open_clip model described by ``folder/open_clip_config.json`` and load ``checkpoint``.

    With ``checkpoint=None`` the weights are random, drawn from ``init_seed`` without touching
    the global RNG (the tiny test model).
    """
    import open_clip

    config_path = folder / "open_clip_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = config["model_cfg"]
        text_cfg, vision_cfg = dict(model_cfg["text_cfg"]), dict(model_cfg["vision_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneLoadError(f"{config_path} is not a valid open_clip config (needs model_cfg with "
                                f"vision_cfg and text_cfg): {err}") from err
    if "timm_model_name" not in vision_cfg or "hf_model_name" not in text_cfg:
        raise UnsupportedBackboneError(
            f"{config_path}: biomedap needs a timm image tower (vision_cfg.timm_model_name) and a Hugging Face "
            "text tower (text_cfg.hf_model_name), as in BiomedCLIP."
        )
    if str(vision_cfg["timm_model_name"]).startswith("biomedap_"):
        from .tiny import register_tiny_vit

        register_tiny_vit()

    with tempfile.TemporaryDirectory(prefix="biomedap-textcfg-") as scratch:
        text_dir = _resolve_text_config_dir(folder, text_cfg["hf_model_name"], cache_dir, Path(scratch))
        tokenizer_dir = _resolve_tokenizer_dir(
            folder, text_dir, text_cfg.get("hf_tokenizer_name", text_cfg["hf_model_name"]), cache_dir
        )
        tokenizer = _load_tokenizer(tokenizer_dir)
        text_override = {**text_cfg, "hf_model_name": str(text_dir), "hf_tokenizer_name": str(tokenizer_dir),
                         "hf_model_pretrained": False}
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            if init_seed is not None:
                torch.manual_seed(init_seed)
            model = open_clip.create_model(
                f"local-dir:{folder}", text_cfg=text_override, load_weights=False, pretrained_text=False
            )
    if checkpoint is not None:
        _load_weights(model, read_state_dict(checkpoint), checkpoint)
    # Hash the loaded tensors, not the file: .bin and .safetensors copies of the same weights
    # (and a model built in memory) share one identity, hence one feature cache.
    weights_sha = state_dict_sha256(model)

    pre = getattr(model.visual, "preprocess_cfg", None) or {}
    preprocess = PreprocessConfig(
        size=int(pre.get("size", vision_cfg.get("image_size", 224)) if not isinstance(pre.get("size"), (tuple, list))
                 else pre["size"][0]),
        mean=tuple(float(x) for x in pre.get("mean", PreprocessConfig().mean)),
        std=tuple(float(x) for x in pre.get("std", PreprocessConfig().std)),
        interpolation=str(pre.get("interpolation", "bicubic")),
        resize_mode=str(pre.get("resize_mode", "shortest")),
    )
    # Where the text config was found is not part of what the model is.
    arch = {**model_cfg, "text_cfg": {k: v for k, v in text_cfg.items() if k not in ("hf_model_name", "hf_tokenizer_name")}}
    identity = BackboneIdentity(
        spec=spec,
        source=source,
        model_cfg_sha256=json_fingerprint(arch),
        weights_sha256=weights_sha,
        preprocess_sha256=json_fingerprint(preprocess.to_dict()),
    )
    backbone = Backbone(model, tokenizer, model_cfg=model_cfg, preprocess=preprocess, identity=identity)
    return backbone.to(device)
