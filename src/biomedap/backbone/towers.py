"""Tower adapters: reach inside an unmodified open_clip model without forking it.

The vision adapter runs the timm ViT trunk block by block so that methods can insert, replace,
overwrite or fuse tokens at any layer; the text adapter feeds word embeddings (including learned
context vectors) through the Hugging Face text transformer, then open_clip's own pooler and
projection.  Both touch open_clip/timm internals that are not public API, so every attribute they
need is checked once at construction and a missing one is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# A block hook receives the index of the block about to run and the tokens entering it, and
# returns the tokens to feed that block.  Extra (prompt) tokens must sit right after the prefix
# tokens (CLS, registers); the adapter derives how many there are from the sequence length.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]

# Visual prompts: a [P, D] or [B, P, D] tensor per block index.
VisualPrompts = Mapping[int, torch.Tensor]


class UnsupportedBackboneError(RuntimeError):
    """The model's towers lack an attribute the adapters rely on (open_clip/timm moved it?)."""


def _require(obj: object, attrs: Sequence[str], where: str) -> None:
    for attr in attrs:
        if not hasattr(obj, attr):
            raise UnsupportedBackboneError(
                f"{where} has no attribute '{attr}' ({type(obj).__module__}.{type(obj).__name__}). "
                "biomedap supports open_clip models whose image tower is a timm ViT and whose text tower "
                "is a Hugging Face encoder (BiomedCLIP's layout), with open-clip-torch>=3.3,<4 and "
                "timm>=1.0,<1.1; check the installed versions against constraints.txt."
            )


class TimmViTTower:
    """Block-by-block access to an open_clip ``TimmModel`` wrapping a timm ``VisionTransformer``.

    Token layout inside the trunk: ``[prefix tokens (CLS, registers) | extra tokens | patches]``.
    Extra tokens (visual prompts) are whatever a hook inserted; they never enter pooling.
    """

    def __init__(self, visual: nn.Module):
        _require(visual, ("trunk", "head"), "open_clip image tower")
        trunk = visual.trunk
        _require(
            trunk,
            ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head",
             "num_prefix_tokens", "embed_dim"),
            "timm image trunk",
        )
        _require(trunk.patch_embed, ("num_patches",), "timm patch embedding")
        self.visual = visual
        self.trunk = trunk

    @property
    def width(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.trunk.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.trunk.num_prefix_tokens)

    @property
    def num_patches(self) -> int:
        return int(self.trunk.patch_embed.num_patches)

    @property
    def num_tokens(self) -> int:
        """Tokens per image without any extra (prompt) tokens."""
        return self.num_prefix_tokens + self.num_patches

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> tokens entering block 0, exactly as timm's forward_features."""
        x = self.trunk.patch_embed(pixels)
        x = self.trunk._pos_embed(x)
        x = self.trunk.patch_drop(x)
        return self.trunk.norm_pre(x)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        hook: BlockHook | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start .. stop-1``; ``hook(i, tokens)`` runs before block ``i``."""
        stop = self.depth if stop is None else stop
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"block range [{start}, {stop}) is invalid for a ViT with {self.depth} blocks")
        for index in range(start, stop):
            if hook is not None:
                tokens = hook(index, tokens)
            tokens = self.trunk.blocks[index](tokens)
        return tokens

    def num_extra_tokens(self, tokens: torch.Tensor) -> int:
        extra = tokens.shape[1] - self.num_tokens
        if extra < 0:
            raise ValueError(
                f"token sequence of length {tokens.shape[1]} is shorter than the {self.num_tokens} "
                "image tokens: a hook removed prefix or patch tokens"
            )
        return extra

    def strip_extra_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        extra = self.num_extra_tokens(tokens)
        if extra == 0:
            return tokens
        p = self.num_prefix_tokens
        return torch.cat([tokens[:, :p], tokens[:, p + extra:]], dim=1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, drop extra tokens, pool as the stock model does, project."""
        x = self.trunk.norm(tokens)
        x = self.strip_extra_tokens(x)
        x = self.trunk.forward_head(x)
        return self.visual.head(x)


def prompt_hook(prompts: VisualPrompts, num_prefix_tokens: int, num_tokens: int) -> BlockHook:
    """Deep visual prompts as a block hook.

    Before each block listed in ``prompts`` the current extra tokens (if any) are removed and the
    given ones inserted after the prefix tokens; blocks not listed keep the tokens the previous
    block produced (VPT-deep semantics).  A ``[P, D]`` tensor is shared by the whole batch.
    """

    def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
        new = prompts.get(index)
        if new is None:
            return tokens
        batch = tokens.shape[0]
        if new.dim() == 2:
            new = new.unsqueeze(0).expand(batch, -1, -1)
        if new.dim() != 3 or new.shape[0] != batch or new.shape[2] != tokens.shape[2]:
            raise ValueError(
                f"visual prompts for block {index} have shape {tuple(new.shape)}; expected [P, {tokens.shape[2]}] "
                f"or [{batch}, P, {tokens.shape[2]}]"
            )
        extra = tokens.shape[1] - num_tokens
        p = num_prefix_tokens
        return torch.cat([tokens[:, :p], new.to(tokens.dtype), tokens[:, p + extra:]], dim=1)

    return hook


def chain_hooks(*hooks: BlockHook | None) -> BlockHook | None:
    active = [h for h in hooks if h is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
        for h in active:
            tokens = h(index, tokens)
        return tokens

    return hook


@dataclass(frozen=True)
class TokenizedText:
    """Token ids and attention mask, padded to the longest text of the batch."""

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long, 1 = real token

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TokenizedText:
        return TokenizedText(self.input_ids.to(device), self.attention_mask.to(device))

    def __getitem__(self, index: slice) -> TokenizedText:
        ids, mask = self.input_ids[index], self.attention_mask[index]
        length = int(mask.sum(dim=1).max()) if len(mask) else 0
        return TokenizedText(ids[:, :length], mask[:, :length])


class HFTextTower:
    """open_clip ``HFTextEncoder`` (BERT-like) fed with token ids or word embeddings.

    Pads to the longest text instead of the model's context length: padding is masked out of
    attention and position embeddings are absolute, so features equal the 256-padded ones
    (within float rounding) at a fraction of the cost.
    """

    def __init__(self, text: nn.Module, tokenizer, context_length: int):
        _require(text, ("transformer", "pooler", "proj", "config"), "open_clip text tower")
        _require(text.transformer, ("get_input_embeddings",), "Hugging Face text transformer")
        _require(tokenizer, ("cls_token_id", "sep_token_id", "pad_token_id"), "text tokenizer")
        from open_clip.tokenizer import get_clean_fn

        self.text = text
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        # open_clip's HFTokenizer cleans whitespace before tokenizing; do the same so ids match.
        self._clean = get_clean_fn("whitespace")
        if text.config.pad_token_id != tokenizer.pad_token_id:
            raise UnsupportedBackboneError(
                f"text model pad id {text.config.pad_token_id} != tokenizer pad id {tokenizer.pad_token_id}"
            )

    @property
    def width(self) -> int:
        return int(self.text.config.hidden_size)

    @property
    def depth(self) -> int:
        return int(self.text.config.num_hidden_layers)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def bos_id(self) -> int:
        """Id of the token that starts every text ([CLS] for BERT); the pooled position."""
        return int(self.tokenizer.cls_token_id)

    @property
    def eos_id(self) -> int:
        """Id of the token that ends every text ([SEP] for BERT)."""
        return int(self.tokenizer.sep_token_id)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text.transformer.get_input_embeddings()

    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(
            [self._clean(t) for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        ids = encoded["input_ids"]
        return TokenizedText(ids, (ids != self.pad_id).long())

    def pieces(self, text: str) -> list[int]:
        """Word-piece ids of ``text`` without the [CLS]/[SEP] specials."""
        return list(self.tokenizer(self._clean(text), add_special_tokens=False)["input_ids"])

    def encode_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text.transformer(inputs_embeds=embeds, attention_mask=attention_mask)
        pooled = self.text.pooler(out, attention_mask)
        return self.text.proj(pooled)
