"""Learned context vectors in the text tower's word-embedding space (CoOp and its descendants).

A prompt for class ``c`` is a row of token ids ``[BOS] … [EOS]`` in which some positions are
*context slots*; at every forward the fixed word embeddings of the row are taken and the learned
context vectors are written into the slots.  Building the rows from word pieces (rather than
tokenizing a placeholder string and slicing) puts the class name exactly where asked, however
many pieces it has — the published code assumed every class name was one token, which breaks
"middle" and "front" placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from ..backbone import Backbone

ClassTokenPosition = Literal["end", "middle", "front"]


@dataclass(frozen=True)
class PromptLayout:
    """Token rows of all classes with the positions of their context slots."""

    input_ids: torch.Tensor  # [C, L]; context slots hold the pad id (their embeddings are replaced)
    attention_mask: torch.Tensor  # [C, L]; 1 on real tokens, context slots included
    ctx_positions: torch.Tensor  # [C, n_ctx] column index of each context slot


def context_from_phrase(backbone: Backbone, phrase: str, n_ctx: int | None) -> tuple[torch.Tensor, list[int]]:
    """Initial context vectors = word embeddings of the phrase's first ``n_ctx`` pieces.

    Returns ``(ctx [n_ctx, width], leftover piece ids)``.  Pieces beyond ``n_ctx`` stay in the
    prompt as fixed text before the class name, which is what the published code does when the
    phrase has more word pieces than context vectors.  ``n_ctx=None`` uses every piece.
    """
    pieces = backbone.text.pieces(phrase)
    if not pieces:
        raise ValueError(f"ctx_init {phrase!r} has no tokens")
    n_ctx = len(pieces) if n_ctx is None else n_ctx
    if n_ctx > len(pieces):
        raise ValueError(
            f"n_ctx={n_ctx} but ctx_init {phrase!r} has only {len(pieces)} word pieces; "
            "lower n_ctx, lengthen ctx_init, or set ctx_init to null for random context"
        )
    with torch.no_grad():
        ctx = backbone.embed_tokens(torch.tensor(pieces[:n_ctx])).detach().clone()
    return ctx, pieces[n_ctx:]


def random_context(backbone: Backbone, n_ctx: int, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    ctx = torch.empty(n_ctx, backbone.text.width)
    torch.nn.init.normal_(ctx, std=std, generator=generator)
    return ctx.to(backbone.device)


def build_prompt_layout(
    backbone: Backbone,
    classnames: Sequence[str],
    n_ctx: int,
    position: ClassTokenPosition = "end",
    *,
    fixed_before_name: Sequence[int] = (),
    suffix: str = ".",
) -> PromptLayout:
    """Rows ``[BOS] ctx… (fixed) name-pieces… suffix [EOS]`` for ``position="end"``.

    ``middle``: ``[BOS] ctx[:n//2] (fixed) name ctx[n//2:] suffix [EOS]``;
    ``front``: ``[BOS] (fixed) name ctx… suffix [EOS]``.
    """
    if position not in ("end", "middle", "front"):
        raise ValueError(f"class_token_position must be 'end', 'middle' or 'front', got {position!r}")
    text = backbone.text
    suffix_ids = text.pieces(suffix) if suffix else []
    half = n_ctx // 2
    rows, slots = [], []
    for name in classnames:
        name_ids = list(fixed_before_name) + text.pieces(name)
        if not text.pieces(name):
            raise ValueError(f"class name {name!r} has no tokens")
        ctx = [None] * n_ctx  # None marks a context slot
        if position == "end":
            body = ctx + name_ids
        elif position == "middle":
            body = ctx[:half] + name_ids + ctx[half:]
        else:
            body = name_ids + ctx
        row = [text.bos_id] + body + suffix_ids + [text.eos_id]
        if len(row) > text.context_length:
            raise ValueError(f"prompt for class {name!r} has {len(row)} tokens, more than the text "
                             f"tower's context length {text.context_length}")
        slots.append([i for i, tok in enumerate(row) if tok is None])
        rows.append([text.pad_id if tok is None else tok for tok in row])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), text.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return PromptLayout(ids, mask, torch.tensor(slots, dtype=torch.long).reshape(len(rows), n_ctx))


def register_layout(module: torch.nn.Module, backbone: Backbone, layout: PromptLayout) -> None:
    """Store a layout on ``module`` as non-persistent buffers: ``token_embeds`` (fixed word embeddings of the
    rows), ``attention_mask``, ``ctx_positions`` and ``input_ids``.

    Derived from the class names and the backbone, so rebuilt on construction and never saved.
    """
    device = backbone.device
    with torch.no_grad():
        token_embeds = backbone.embed_tokens(layout.input_ids)
    module.register_buffer("token_embeds", token_embeds.to(device), persistent=False)
    module.register_buffer("attention_mask", layout.attention_mask.to(device), persistent=False)
    module.register_buffer("ctx_positions", layout.ctx_positions.to(device), persistent=False)
    module.register_buffer("input_ids", layout.input_ids.to(device), persistent=False)


def insert_context(token_embeds: torch.Tensor, ctx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Write context vectors into their slots.

    Args:
        token_embeds: fixed word embeddings of the rows [C, L, W] (or [N, L, W] with N = B·C).
        ctx: [n, W] shared, [C, n, W] class-specific, or any [N, n, W] matching the rows.
        positions: slot columns [C, n] (or [N, n]).
    """
    rows, _, width = token_embeds.shape
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(rows, -1, -1)
    index = positions.to(token_embeds.device).unsqueeze(-1).expand(-1, -1, width)
    return token_embeds.scatter(1, index, ctx.to(token_embeds.dtype))
