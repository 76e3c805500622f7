"""The frozen vision-language backbone shared by every method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import PreprocessConfig
from .towers import BlockHook, HFTextTower, TimmViTTower, TokenizedText, VisualPrompts, chain_hooks, prompt_hook


@dataclass(frozen=True)
class BackboneIdentity:
    """What a backbone is, for run cards and cache keys.

    ``fingerprint`` changes whenever the architecture, the weights or the preprocessing change,
    and never because a file moved.
    """

    spec: str  # what the user asked for, e.g. "biomedclip" or "local-dir:/models/bmc"
    source: str  # "hf-hub" | "local-dir" | "tiny"
    model_cfg_sha256: str
    weights_sha256: str
    preprocess_sha256: str

    @property
    def fingerprint(self) -> str:
        from ..io import json_fingerprint

        return json_fingerprint([self.model_cfg_sha256, self.weights_sha256, self.preprocess_sha256])[:20]

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}


class Backbone:
    """A frozen open_clip model with tower adapters, tokenizer and preprocessing config.

    Not an ``nn.Module`` on purpose: methods keep a reference to it without its ~200 M frozen
    parameters entering their ``state_dict``.  All parameters have ``requires_grad=False``;
    gradients still flow *through* the towers to prompt tokens and context vectors.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        model_cfg: dict,
        preprocess: PreprocessConfig,
        identity: BackboneIdentity,
    ):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        self.identity = identity
        self.vision = TimmViTTower(model.visual)
        self.text = HFTextTower(model.text, tokenizer, int(model_cfg["text_cfg"].get("context_length", 256)))

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: torch.device | str) -> Backbone:
        self.model.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the checkpoint's learned log-scale (≈ 85.23 for BiomedCLIP), a 0-dim tensor."""
        return self.model.logit_scale.detach().exp().reshape(())

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The text tower's word-embedding table (learned context vectors live in this space)."""
        return self.text.word_embeddings

    def set_text_dropout(self, active: bool) -> None:
        """Put the frozen text transformer in train mode (dropout on) or eval mode.

        Some published prompt learners trained with BERT dropout active (their frameworks called
        ``train()`` on the whole model); this is a per-method preset field, never a global default.
        """
        self.model.text.train(active)

    @contextlib.contextmanager
    def text_dropout(self, active: bool) -> Iterator[None]:
        previous = self.model.text.training
        self.set_text_dropout(active)
        try:
            yield
        finally:
            self.set_text_dropout(previous)

    def validate_block_indices(self, indices: Iterable[int], option: str, *, allow_depth: bool = False) -> list[int]:
        """Check ViT block indices given to a method; the error names the option and the valid range.

        ``allow_depth`` also accepts ``depth`` itself (a position after the last block, e.g. a prefix
        that runs every block).
        """
        depth = self.vision.depth
        top = depth if allow_depth else depth - 1
        checked = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= top:
                raise ValueError(
                    f"{option}: block index {index!r} is out of range for this backbone's ViT with "
                    f"{depth} blocks (valid: 0..{top})"
                )
            checked.append(index)
        return checked

    # ------------------------------------------------------------------ image side
    def encode_image(
        self,
        pixels: torch.Tensor | None = None,
        *,
        prompts: VisualPrompts | torch.Tensor | None = None,
        hook: BlockHook | None = None,
        tokens: torch.Tensor | None = None,
        start_block: int = 0,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Image features [B, embed_dim].

        Args:
            pixels: preprocessed images [B, 3, H, W]; or give ``tokens`` instead.
            prompts: visual prompt tokens per block index (``{block: [P, D] | [B, P, D]}``), inserted
                after the prefix tokens and replaced at every listed block; a bare tensor means
                ``{start_block: tensor}`` (shallow prompts).
            hook: ``hook(block_index, tokens) -> tokens`` called before each block (after prompts).
            tokens: tokens entering block ``start_block`` (e.g. from :meth:`encode_image_prefix`).
            start_block: first block to run when starting from ``tokens``.
            normalize: L2-normalise the output.
        """
        if (pixels is None) == (tokens is None):
            raise ValueError("encode_image needs exactly one of `pixels` or `tokens`")
        if tokens is None:
            if start_block != 0:
                raise ValueError("start_block > 0 needs `tokens` (use encode_image_prefix to get them)")
            tokens = self.vision.embed(pixels.to(self.device))
        else:
            tokens = tokens.to(self.device)
        if isinstance(prompts, torch.Tensor):
            prompts = {start_block: prompts}
        if prompts:
            self.validate_block_indices(prompts.keys(), "prompts")
            prompts = prompt_hook(prompts, self.vision.num_prefix_tokens, self.vision.num_tokens)
        tokens = self.vision.run_blocks(tokens, start=start_block, hook=chain_hooks(prompts or None, hook))
        features = self.vision.pool(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_prefix(self, pixels: torch.Tensor, upto: int, *, hook: BlockHook | None = None) -> torch.Tensor:
        """Tokens entering block ``upto``: cacheable when nothing before it is learned.

        ``hook`` is a fixed (parameter-free) per-block modification of blocks ``0 .. upto-1``, such
        as Biomed-DPT's released zero-token overwrite; it is not applied before block ``upto``.
        """
        if not 0 <= upto <= self.vision.depth:
            raise ValueError(f"upto={upto} is out of range 0..{self.vision.depth}")
        return self.vision.run_blocks(self.vision.embed(pixels.to(self.device)), 0, upto, hook=hook)

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        """Token ids + mask padded to the longest text (never to the 256-token context)."""
        return self.text.tokenize(texts)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids.to(self.device))

    def encode_text(
        self,
        texts: Sequence[str] | TokenizedText,
        *,
        normalize: bool = False,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Text features [N, embed_dim] for strings (or already tokenized text), in batches."""
        tokenized = texts if isinstance(texts, TokenizedText) else self.tokenize(texts)
        chunks = []
        for start in range(0, len(tokenized), batch_size):
            part = tokenized[start:start + batch_size].to(self.device)
            chunks.append(self.encode_text_embeddings(self.embed_tokens(part.input_ids), part.attention_mask))
        features = torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim, device=self.device)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_embeddings(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Word embeddings [N, L, width] (learned context vectors included) -> features [N, embed_dim].

        The embeddings are raw word embeddings: the text transformer still adds its position and
        token-type embeddings and applies its embedding LayerNorm, exactly as for token ids.
        """
        features = self.text.encode_embeddings(embeds, attention_mask.to(embeds.device))
        return F.normalize(features, dim=-1) if normalize else features

    def __repr__(self) -> str:
        return (
            f"Backbone(spec={self.identity.spec!r}, vision=ViT[{self.vision.depth}x{self.vision.width}], "
            f"text=[{self.text.depth}x{self.text.width}], embed_dim={self.embed_dim}, "
            f"image_size={self.preprocess.size}, device={self.device})"
        )
