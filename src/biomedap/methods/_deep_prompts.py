"""Shared pieces of the deep-prompt methods (Biomed-DPT, BiomedAP): clinical text prompts, deep visual prompts.

Three building blocks and two loss terms, each usable on its own:

* :class:`ClinicalPromptLearner` — learnable context inside a per-dataset clinical template. For
  ``"a MR photo of a {} in the brain."`` and ``n_ctx = 5`` the prompt of class ``c`` is::

      [CLS] <ctx1> <ctx2> <ctx3> <ctx4> <ctx5> <pieces of c> in the brain . [SEP]

  i.e. the template's token row with the first ``n_ctx`` word pieces of its leading phrase (the text
  before ``{}``) replaced by learned vectors, initialised from those pieces ("a mr photo of a"),
  from another phrase, or at random. Pieces of the phrase beyond ``n_ctx`` stay fixed text (the
  published ``N_CTX < len(CTX_INIT)`` case: "a chest x - ray photo" learned, "of a" fixed).
  ``learner()`` returns the normalised class text features [C, D].
* :class:`DeepVisualPrompts` — ``n_tokens`` learnable tokens per listed ViT block, zero-initialised,
  inserted after the prefix tokens (CLS) and replaced before each listed block;
  ``prompts()`` is the ``{block: [n_tokens, width]}`` dict that ``Backbone.encode_image(prompts=...)``
  takes. Blocks before :attr:`DeepVisualPrompts.first_block` see no prompt, so their output can come
  from the feature cache.
* :func:`zero_overwrite_hook` — the released Biomed-DPT/BiomedAP "visual prompt": ``n_tokens`` fixed
  zero vectors *overwriting* the first patch tokens before every listed block (parameter-free).
* :func:`l1_anchor_loss` ``mean_{c,d} |t − h|`` and :func:`kl_distillation`
  ``Σ_{b,c} p^T (log p^T − log p^S) / (B·C)`` (temperature 1): the published distillation terms.

Template ``"clinical"`` picks the dataset's clinical template from the class names (see
:func:`resolve_prompt_template`): methods are given class names, not dataset names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..prompts.templates import TEMPLATES
from ._prompting import (
    PromptLayout,
    build_prompt_layout,
    context_from_phrase,
    insert_context,
    random_context,
    register_layout,
)
from .base import MethodConfig

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..backbone.towers import BlockHook

__all__ = [
    "ClinicalPromptConfig",
    "CLINICAL",
    "CTX_FROM_TEMPLATE",
    "ClinicalPromptLearner",
    "DeepVisualPrompts",
    "POSITIONS",
    "PromptPosition",
    "check_overwrite_fits",
    "kl_distillation",
    "l1_anchor_loss",
    "overwrite_fingerprint",
    "released_middle_layout",
    "resolve_prompt_blocks",
    "resolve_prompt_template",
    "split_template",
    "zero_overwrite_hook",
]

CLINICAL = "clinical"
"""Template option value: the clinical template of the dataset the class names belong to."""

CTX_FROM_TEMPLATE = "template"
"""``ctx_init`` option value: initialise the context from the template's own leading phrase."""

FALLBACK_TEMPLATE = "a photo of a {}."

# "middle_released": the published code's "middle" (its class-name length was always 1, §4.1 of the
# reference notes): the first piece after the learned span moves between the two context halves.
PromptPosition = Literal["end", "middle", "front", "middle_released"]
POSITIONS: tuple[str, ...] = ("end", "middle", "front", "middle_released")


# ------------------------------------------------------------------------------------ templates


def resolve_prompt_template(template: str, classnames: Sequence[str], descriptions: str | None = None) -> str:
    """The template text (one ``{}``) that ``template`` names for these class names.

    * ``"clinical"``: the clinical template ``clinical/<key>`` of the catalog dataset whose
      description bank covers ``classnames`` (:func:`biomedap.prompts.banks.find_bank`; a
      base-to-novel half finds its dataset). ``descriptions="builtin:<key>"`` names the dataset
      directly (needed where several datasets share class names, e.g. the MedMNIST+ Organ sets).
      Class names of no catalog dataset (a custom folder) get ``"a photo of a {}."``.
    * a template id (``"clinical/btmri"``, ``"generic"``; see :mod:`biomedap.prompts.templates`);
    * otherwise the text itself, which must contain exactly one ``{}``.
    """
    from ..prompts.banks import AmbiguousBankError, find_bank
    from ..prompts.templates import TEMPLATES, resolve_template

    if template == CLINICAL:
        key = None
        source = (descriptions or "").strip()
        if source.startswith("builtin:") and source[len("builtin:"):].strip():
            from ..data.catalog import get_dataset_spec

            key = get_dataset_spec(source[len("builtin:"):].strip()).key
        else:
            try:
                key = find_bank(classnames)
            except AmbiguousBankError as err:
                raise ValueError("template 'clinical' cannot tell the dataset from these class names: set "
                                 "method.descriptions=builtin:<dataset> (it also picks the teacher's bank) or "
                                 f"method.template=clinical/<dataset>. ({err})") from None
        if key is None:
            return FALLBACK_TEMPLATE
        tid = f"{CLINICAL}/{key}"
        return TEMPLATES.get(tid, FALLBACK_TEMPLATE)
    text = resolve_template(template)
    if text.count("{}") != 1:
        raise ValueError(f"template {template!r} must be 'clinical', a template id or a text with exactly one '{{}}' "
                         f"for the class name (resolved to {text!r})")
    return text


def split_template(template: str) -> tuple[str, str]:
    """``(leading phrase, rest)`` around the ``{}``, stripped: ``("a MR photo of a", "in the brain.")``."""
    head, _, tail = template.partition("{}")
    return head.strip(), tail.strip()


def released_middle_layout(layout: PromptLayout, n_ctx: int) -> PromptLayout:
    """Turn an ``"end"`` layout ``[CLS] ctx₁…ctxₙ b₀ b₁ …`` into the published "middle" one.

    ``[CLS] ctx[:⌊n/2⌋] b₀ ctx[⌊n/2⌋:] b₁ …`` where ``b`` is the token row after the learned span
    (fixed phrase pieces, class-name pieces, rest of the template, [SEP]): the *first piece* after
    the context moves between the two halves, whatever the class name's length (the published code
    took every class name to be one piece). Length and attention mask are unchanged.
    """
    ids, mask = layout.input_ids, layout.attention_mask
    expected = torch.arange(1, n_ctx + 1).expand_as(layout.ctx_positions)
    if not torch.equal(layout.ctx_positions.cpu(), expected):
        raise ValueError("released_middle_layout expects an 'end' layout (context right after [CLS])")
    half = n_ctx // 2
    order = [0, *range(1, 1 + half), n_ctx + 1, *range(1 + half, n_ctx + 1), *range(n_ctx + 2, ids.shape[1])]
    slots = [*range(1, 1 + half), *range(half + 2, n_ctx + 2)]
    positions = torch.tensor(slots, dtype=torch.long).expand(ids.shape[0], -1).clone()
    return PromptLayout(ids[:, order].contiguous(), mask[:, order].contiguous(), positions)


# ------------------------------------------------------------------------------------ text side


class ClinicalPromptLearner(nn.Module):
    """Learned context inside a clinical template; ``forward()`` = normalised class text features [C, D].

    Args:
        backbone: the frozen backbone (referenced, not owned).
        classnames: class names in label order.
        template: ``"clinical"``, a template id or a text with one ``{}`` (:func:`resolve_prompt_template`).
        n_ctx: number of learned vectors; they replace the first ``n_ctx`` word pieces of the
            template's leading phrase (``None`` = all of them). More than the phrase has is an error
            (the published code silently overwrote class-name tokens).
        ctx_init: ``"template"`` = the embeddings of those pieces (the published ``CTX_INIT`` is the
            template's phrase); another phrase = the embeddings of its first ``n_ctx`` pieces;
            ``None`` = random N(0, init_std²) from the global RNG.
        position: ``"end"`` (context, then the class name: the template's own order), ``"middle"``,
            ``"front"`` (pieces placed exactly, see :func:`._prompting.build_prompt_layout`), or
            ``"middle_released"`` (:func:`released_middle_layout`).
        descriptions: the method's ``descriptions`` option, read only by ``template="clinical"``.

    State: one parameter ``ctx`` [n_ctx, width]; everything else is a non-persistent buffer rebuilt
    from the class names (:meth:`set_classnames`). The template is resolved once, at construction,
    and kept when the class names change (base-to-novel: the learned context belongs to it).
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        *,
        template: str = CLINICAL,
        n_ctx: int | None = None,
        ctx_init: str | None = CTX_FROM_TEMPLATE,
        position: PromptPosition = "end",
        init_std: float = 0.02,
        descriptions: str | None = None,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {', '.join(POSITIONS)}, got {position!r}")
        self.backbone = backbone  # plain attribute: not an nn.Module, never saved
        self.position = position
        self.template = resolve_prompt_template(template, classnames, descriptions)
        self.phrase, self.rest = split_template(self.template)
        phrase_pieces = backbone.text.pieces(self.phrase) if self.phrase else []
        n = len(phrase_pieces) if n_ctx is None else int(n_ctx)
        if n < 1:
            raise ValueError(f"template {self.template!r} has no words before '{{}}' to learn; give a template with "
                             "a leading phrase (e.g. 'a MR photo of a {}.')")
        if n > len(phrase_pieces):
            raise ValueError(
                f"n_ctx={n} but the phrase {self.phrase!r} before the class name in template {self.template!r} has "
                f"{len(phrase_pieces)} word pieces; lower n_ctx (null = all of them) or use a longer template")
        if ctx_init == CTX_FROM_TEMPLATE:
            with torch.no_grad():
                ctx = backbone.embed_tokens(torch.tensor(phrase_pieces[:n])).detach().clone()
        elif ctx_init:
            ctx, _ = context_from_phrase(backbone, ctx_init, n)
        else:
            ctx = random_context(backbone, n, init_std)
        self.ctx = nn.Parameter(ctx.to(backbone.device))
        self._fixed_pieces = phrase_pieces[n:]
        self.set_classnames(classnames)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the token rows for other class names (same template, same learned context)."""
        self.classnames = list(classnames)
        base = "end" if self.position == "middle_released" else self.position
        layout = build_prompt_layout(self.backbone, self.classnames, self.n_ctx, base,
                                     fixed_before_name=self._fixed_pieces, suffix=self.rest)
        if self.position == "middle_released":
            layout = released_middle_layout(layout, self.n_ctx)
        register_layout(self, self.backbone, layout)

    def prompt_texts(self) -> list[str]:
        """The template filled with each class name (what the prompts are before the context learns)."""
        return [self.template.replace("{}", name) for name in self.classnames]

    def prompt_embeddings(self) -> torch.Tensor:
        """Word embeddings of the prompt rows with the context written in [C, L, width]."""
        return insert_context(self.token_embeds, self.ctx, self.ctx_positions)

    def forward(self) -> torch.Tensor:
        """Normalised class text features [C, D] for the current context."""
        return self.backbone.encode_text_embeddings(self.prompt_embeddings(), self.attention_mask, normalize=True)


# ------------------------------------------------------------------------------------ image side


class DeepVisualPrompts(nn.Module):
    """``n_tokens`` learnable visual prompt tokens for each block of ``blocks`` (VPT-deep).

    One parameter ``tokens`` [len(blocks), n_tokens, width], zero-initialised (Biomed-DPT's
    "zero-vector soft prompts"). :meth:`prompts` gives ``{block: [n_tokens, width]}`` for
    ``Backbone.encode_image(prompts=...)``, which inserts them after the prefix tokens before each
    listed block, replacing the previous block's prompt outputs. Zero tokens are *not* neutral:
    they still enter attention (as the LayerNorm bias), so even at initialisation the image
    features differ from the unprompted ones.
    """

    def __init__(self, n_tokens: int, blocks: Iterable[int], width: int, *, device: torch.device | str | None = None):
        super().__init__()
        blocks = sorted({int(b) for b in blocks})
        if n_tokens < 1:
            raise ValueError(f"n_visual_tokens must be ≥ 1, got {n_tokens}")
        if not blocks:
            raise ValueError("deep visual prompts need at least one block")
        self.blocks: tuple[int, ...] = tuple(blocks)
        self.tokens = nn.Parameter(torch.zeros(len(blocks), n_tokens, width, device=device))

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def first_block(self) -> int:
        """The first prompted block: blocks before it run unprompted (cacheable)."""
        return self.blocks[0]

    def prompts(self) -> dict[int, torch.Tensor]:
        """``{block: tokens [n_tokens, width]}`` (views of the parameter: gradients flow)."""
        return {block: self.tokens[i] for i, block in enumerate(self.blocks)}

    def forward(self) -> dict[int, torch.Tensor]:
        return self.prompts()


def zero_overwrite_hook(n_tokens: int, num_prefix_tokens: int, blocks: Iterable[int]) -> BlockHook:
    """The released "visual prompt": before each block in ``blocks``, tokens
    ``num_prefix_tokens … num_prefix_tokens + n_tokens − 1`` (the first patch tokens, right after
    CLS) are replaced by zeros. Nothing is inserted; the sequence length is unchanged. Parameter-free,
    so everything it produces can be cached.
    """
    blocks = frozenset(int(b) for b in blocks)
    p, n = int(num_prefix_tokens), int(n_tokens)

    def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
        if index not in blocks:
            return tokens
        zeros = tokens.new_zeros(tokens.shape[0], n, tokens.shape[2])
        return torch.cat([tokens[:, :p], zeros, tokens[:, p + n:]], dim=1)

    return hook


def overwrite_fingerprint(n_tokens: int, blocks: Sequence[int], depth: int) -> str:
    """Cache-namespace name of :func:`zero_overwrite_hook`: ``overwrite4``, or ``overwrite4@0,2`` for some blocks."""
    name = f"overwrite{n_tokens}"
    if tuple(blocks) != tuple(range(depth)):
        name += "@" + ",".join(map(str, blocks))
    return name


def resolve_prompt_blocks(backbone: Backbone, prompt_blocks: Sequence[int] | None, start: int) -> tuple[int, ...]:
    """The prompted ViT blocks, sorted: ``prompt_blocks`` checked against the depth, else ``start .. depth-1``."""
    depth = backbone.vision.depth
    if prompt_blocks is not None:
        return tuple(sorted(backbone.validate_block_indices(prompt_blocks, "prompt_blocks")))
    if start >= depth:
        raise ValueError(f"prompt_start: block {start} is out of range for this backbone's ViT with {depth} blocks "
                         f"(valid: 0..{depth - 1})")
    return tuple(range(start, depth))


def check_overwrite_fits(backbone: Backbone, n_tokens: int) -> None:
    """The released overwrite replaces ``n_tokens`` patch tokens: there must be that many."""
    if n_tokens > backbone.vision.num_patches:
        raise ValueError(f"n_visual_tokens={n_tokens} overwrites more patch tokens than the "
                         f"{backbone.vision.num_patches} the ViT has")


# ------------------------------------------------------------------------------------ losses


def l1_anchor_loss(text: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``mean_{c,d} |t_{c,d} − h_{c,d}|`` over the C×D elements (unweighted)."""
    return (text - anchor.to(text.dtype)).abs().mean()


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(1/(B·C)) Σ_{b,c} p^T (log p^T − log p^S)``, ``p = softmax`` at temperature 1 (unweighted).

    KL(teacher ‖ student) summed over the batch and the classes, then divided by the number of
    logits — C times smaller than ``reduction="batchmean"``, as published.
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / student_logits.numel()


# ------------------------------------------------------------------------------------ shared options


@dataclass
class ClinicalPromptConfig(MethodConfig):
    """Options Biomed-DPT and BiomedAP share: the clinical text prompt learner, the deep visual
    prompts and the description-bank teacher (each method adds its own loss weights and variant)."""

    text_dropout: bool = field(
        default=True,
        metadata={"help": "run the frozen text transformer in train mode (dropout active) while training, as the "
                          "published trainer did"},
    )
    template: str = field(
        default=CLINICAL,
        metadata={"help": "prompt template: 'clinical' (the clinical template of the catalog dataset the class names "
                          "belong to; 'a photo of a {}.' for other class names), a template id (clinical/btmri) or a "
                          "text with one '{}'"},
    )
    n_ctx: int | None = field(
        default=None,
        metadata={"help": "learned context vectors: they replace the first n_ctx word pieces of the template's "
                          "phrase before '{}'; null = all of them"},
    )
    ctx_init: str | None = field(
        default=CTX_FROM_TEMPLATE,
        metadata={"help": "context initialisation: 'template' (the replaced pieces' own embeddings, the published "
                          "CTX_INIT), a phrase (its first n_ctx pieces), or null (random N(0, init_std²))"},
    )
    class_token_position: PromptPosition | None = field(
        default=None,
        metadata={"help": "end | middle | front (class-name pieces placed exactly) | middle_released (the published "
                          "layout: the first piece after the context moves between its halves); null = end, or "
                          "Biomed-DPT's middle_released with variant=released"},
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random context initialisation"})
    n_visual_tokens: int = field(
        default=4, metadata={"help": "visual prompt tokens per prompted block (released: patch tokens overwritten)"}
    )
    prompt_blocks: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "ViT blocks (0-based) that get fresh visual prompts (released: zero overwrites); null = "
                          "every block from prompt_start"},
    )
    descriptions: str = field(
        default="builtin",
        metadata={"help": "teacher description bank: builtin, builtin:<dataset> or a bank file (see "
                          "`biomedap prompts`)"},
    )
    lambda_kl: float = field(
        default=0.25, metadata={"help": "λ_KL: weight of KL(softmax(s f hᵀ) ‖ softmax(s f tᵀ)) summed / (B·C)"}
    )

    def check_prompt_options(self) -> None:
        """Validate the shared options (called by each method's ``__post_init__``)."""
        if self.template != CLINICAL:
            text = TEMPLATES.get(self.template, self.template)
            if text.count("{}") != 1:
                raise ValueError(f"template: {self.template!r} must be 'clinical', a template id or a text with "
                                 "exactly one '{}' for the class name")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be ≥ 1 or null, got {self.n_ctx}")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init: empty; use 'template', a phrase, or null for random context")
        if self.class_token_position is not None and self.class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {', '.join(POSITIONS)} or null, "
                             f"got {self.class_token_position!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.n_visual_tokens < 1:
            raise ValueError(f"n_visual_tokens must be ≥ 1, got {self.n_visual_tokens}")
        if self.prompt_blocks is not None:
            if not self.prompt_blocks:
                raise ValueError("prompt_blocks: give at least one block, or null for every block from prompt_start")
            if len(set(self.prompt_blocks)) != len(self.prompt_blocks):
                raise ValueError(f"prompt_blocks: a block is listed twice: {list(self.prompt_blocks)}")
        if not self.lambda_kl >= 0:
            raise ValueError(f"lambda_kl must be ≥ 0, got {self.lambda_kl}")
