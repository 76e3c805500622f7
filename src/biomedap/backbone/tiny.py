"""A tiny, randomly initialised BiomedCLIP-shaped model that builds offline in about a second.

Same layout as BiomedCLIP — a timm ViT image tower with CLS pooling and a linear head, a BERT text
tower with [CLS] pooling and an MLP projection, a WordPiece tokenizer — at toy sizes: 64 px
images (16 patches), 6 ViT blocks of width 64, a 2-layer BERT of width 64, a 32-d joint space.
It goes through exactly the loading code used for real checkpoints (a ``local-dir`` folder).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_VIT_NAME = "biomedap_tiny_vit"
TINY_OPEN_CLIP_NAME = "biomedap-tiny"
TINY_TEXT_NAME = "biomedap-tiny-bert"
TINY_IMAGE_SIZE = 64
TINY_EMBED_DIM = 32
TINY_VIT_ARGS = dict(img_size=TINY_IMAGE_SIZE, patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=4.0)
# BERT's usual init (std 0.02) makes a random 2-layer BERT map every prompt to nearly the same
# feature (pairwise cosine > 0.999), so prompt learning has nothing to act on; a wider init gives
# prompts distinct features (cosine ~0.7), as in a trained text tower.
TINY_BERT_ARGS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      max_position_embeddings=256, pad_token_id=0, initializer_range=0.3)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Words kept whole in the generated vocabulary: template words, modalities, common findings.
# Any longer word that is not listed is split into word pieces, so that some class names span
# several pieces (e.g. "meningioma" -> "meni ##ngio ##ma"), as with the real PubMedBERT vocabulary.
COMMON_WORDS = """
a an the of in on at to and or with without by for from as is are this that it its image images
photo picture scan view slice film medical clinical mr mri ct x ray xray chest lung lungs brain
breast kidney knee joint skin eye retina colon tissue cell cells normal healthy benign malignant
tumor tumour cyst stone mass lesion nodule round dark bright pale red blue white black large small
irregular border cluster clusters dots spots ring disc stripes texture noise dense scattered
glioma polyps polyp drusen cataract covid viral opacity severe moderate minimal doubtful
ultrasound endoscopic endoscopy fundus oct histopathological histology dermatoscopy dermatoscopic
frontal presented affected lower upper left right center edge rim
""".split()


def register_tiny_vit() -> None:
    """Register the tiny ViT with timm's model registry (idempotent)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if timm.is_model(TINY_VIT_NAME):
        return

    def biomedap_tiny_vit(pretrained: bool = False, **kwargs):
        args = {**TINY_VIT_ARGS, **kwargs}
        # An explicit pretrained config keeps timm from warning that none exists.
        if not args.get("pretrained_cfg"):
            args["pretrained_cfg"] = {"input_size": (3, args["img_size"], args["img_size"])}
        return _create_vision_transformer(TINY_VIT_NAME, pretrained=False, **args)

    biomedap_tiny_vit.__name__ = TINY_VIT_NAME
    register_model(biomedap_tiny_vit)


def _word_pieces(word: str) -> list[str]:
    if len(word) <= 8 or word in COMMON_WORDS:
        return [word]
    return [word[:4]] + ["##" + word[i:i + 4] for i in range(4, len(word), 4)]


def tiny_vocabulary(extra_texts: tuple[str, ...] = ()) -> list[str]:
    """A deterministic WordPiece vocabulary: specials, characters, common words, catalog words."""
    from ..data.catalog import list_datasets

    texts = list(extra_texts)
    for spec in list_datasets():
        texts += list(spec.classnames) + [spec.zeroshot_template, spec.clinical_template, spec.ctx_init]
    words: list[str] = list(COMMON_WORDS)
    for text in texts:
        for raw in text.lower().replace("{}", " ").split():
            word = "".join(ch for ch in raw if ch.isalnum())
            if word:
                words.extend(_word_pieces(word))
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punctuation = list(".,;:!?()[]{}'\"-/_+%&*=<>#@$^~`|\\")
    vocab = list(SPECIAL_TOKENS) + punctuation + list(chars) + ["##" + c for c in chars]
    seen = set(vocab)
    for word in words:
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def tiny_model_config() -> dict:
    return {
        "embed_dim": TINY_EMBED_DIM,
        "vision_cfg": {"timm_model_name": TINY_VIT_NAME, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": TINY_IMAGE_SIZE},
        "text_cfg": {"hf_model_name": TINY_TEXT_NAME, "hf_tokenizer_name": TINY_TEXT_NAME, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    }


def write_tiny_folder(folder: Path) -> Path:
    """Config, text config and tokenizer of the tiny model (no weights) in ``folder``."""
    from transformers import BertConfig, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocabulary()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertConfig(vocab_size=len(vocab), **TINY_BERT_ARGS).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True).save_pretrained(folder)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": tiny_model_config(),
                    "preprocess_cfg": {"size": TINY_IMAGE_SIZE, "mean": [0.48145466, 0.4578275, 0.40821073],
                                       "std": [0.26862954, 0.26130258, 0.27577711],
                                       "interpolation": "bicubic", "resize_mode": "shortest"}}, indent=2),
        encoding="utf-8",
    )
    return folder


def register_tiny_open_clip_config(folder: Path) -> str:
    """Register the tiny model in open_clip's own config registry; returns its open_clip name.

    Afterwards ``open_clip.create_model(name, pretrained_hf=False)`` and ``open_clip.get_tokenizer(name)``
    build the same model and tokenizer as :func:`build_tiny_backbone`, through open_clip alone —
    the tests use this to check the adapters against the stock model.  The text config and
    vocabulary are written to ``folder``, which must outlive the registration (open_clip reads
    them at model creation).
    """
    import open_clip

    folder = write_tiny_folder(Path(folder))
    register_tiny_vit()
    config = tiny_model_config()
    config["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
    config_path = folder / f"{TINY_OPEN_CLIP_NAME}.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    open_clip.add_model_config(config_path)
    return TINY_OPEN_CLIP_NAME


def build_tiny_backbone(seed: int = 0, device: str | torch.device = "cpu"):
    """The tiny model with weights drawn from ``seed`` (the global RNG is left untouched)."""
    from .loading import build_from_folder

    with tempfile.TemporaryDirectory(prefix="biomedap-tiny-") as tmp:
        folder = write_tiny_folder(Path(tmp))
        return build_from_folder(folder, spec=f"tiny:{seed}", source="tiny", checkpoint=None,
                                 device=device, init_seed=seed)


# ---------------------------------------------------------------------------- full-size, random


def biomedclip_model_config() -> dict:
    """BiomedCLIP's published open_clip model config (ViT-B/16 + PubMedBERT, 512-d, 256 tokens)."""
    from .loading import BIOMEDBERT_HUB_ID

    return {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": BIOMEDBERT_HUB_ID, "hf_tokenizer_name": BIOMEDBERT_HUB_ID,
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    }


def build_random_biomedclip(seed: int = 0, device: str | torch.device = "cpu"):
    """The full-size BiomedCLIP architecture with random weights (benchmarks; ~196 M parameters).

    The tokenizer is the tiny generated vocabulary padded to BERT's 30,522 entries, so prompts
    tokenize to realistic lengths without the real PubMedBERT vocabulary.
    """
    from transformers import BertTokenizerFast

    from .loading import build_from_folder

    with tempfile.TemporaryDirectory(prefix="biomedap-random-bmc-") as tmp:
        folder = Path(tmp)
        vocab = tiny_vocabulary()
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True).save_pretrained(folder)
        (folder / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": biomedclip_model_config(),
                        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                           "std": [0.26862954, 0.26130258, 0.27577711]}}),
            encoding="utf-8",
        )
        return build_from_folder(folder, spec=f"random-biomedclip:{seed}", source="random", checkpoint=None,
                                 device=device, init_seed=seed)
