"""Gated cross-modal prompt fusion (BiomedAP): one module per fusion layer.

Two modules with the same call, ``v', t' = module(v, t)`` on a visual stream ``v`` [B, Nv, Wv]
(tokens of the ViT at a fusion layer) and a text stream ``t`` [B, Nt, Wt] (learned context
vectors in the text tower's word-embedding space):

:class:`GatedPromptFusion` — ours (the paper's description, made to start at identity). Pre-LayerNorm,
everything inside at width ``dim`` (``u_v = P_v LN_v(v)``, ``u_t = P_t LN_t(t)``; ``P`` is a linear
projection, the identity when the width already is ``dim``)::

    A_t = MHA_t(query = u_t, key = value = u_v)            # the text side reads the image
    t'  = t + O_t( σ(G_t [u_t ; A_t] + b) ⊙ A_t + FFN_t(u_t) )
    A_v = MHA_v(query = u_v, key = value = [u'_t ; u_v])   # the visual side reads that text jointly
                                                           # with the image's own tokens (u'_t = P_t LN_t(t'))
    v'  = v + O_v( σ(G_v [u_v ; A_v] + b) ⊙ A_v + FFN_v(u_v) )

(``O`` projects back to the stream's width, the identity when it is ``dim``, without bias;
``FFN`` = Linear → GELU → Dropout → Linear → Dropout, parallel to the gated attention.) The two
directions run in sequence (text, then image) rather than side by side so that the text branch
reaches the prediction: if ``t'`` only fed an alignment term that is minimal at ``t' = t``
(BiomedAP's), a text branch starting at the identity would get no gradient at all.

Initialisation: the gate weights ``G`` are zero and their bias ``b = gate_bias`` (−6), so every
gate starts at exactly ``σ(−6) ≈ 0.0025``; the FFN output layer starts at
``N(0, ffn_out_init_std²)`` (1e-5, bias 0). Both residual branches start near zero, so
``‖v' − v‖ ≪ ‖v‖`` and ``‖t' − t‖ ≪ ‖t‖`` at initialisation while every parameter has a non-zero
gradient. (An exactly-zero FFN output layer would give the FFN's input layer an exactly-zero
gradient on the first step; the tiny non-zero start avoids that dead step.)

:class:`ReleasedPromptFusion` — ``CrossModalPromptFusion`` of the released BiomedAP code, as read
in ``biomed-methods.md`` §5.3 (no pre-LN, gates on the stream alone, default PyTorch inits)::

    A_v = MHA_v2t(query = v, key = value = t),   A_t = MHA_t2v(query = t, key = value = v)
    γ_v = σ(W_gv v + b_gv),                      γ_t = σ(W_gt t + b_gt)
    v̄ = LN_v(v + γ_v ⊙ v + (1 − γ_v) ⊙ A_v),    t̄ = LN_t(t + γ_t ⊙ t + (1 − γ_t) ⊙ A_t)
    v' = v̄ + FFN_v(v̄),                         t' = t̄ + FFN_t(t̄)

at width ``dim`` (768 for BiomedCLIP, where its in/out projections are identities), 8 heads,
dropout 0.1 in both attentions and FFNs, FFN 4×: ≈ 15.35 M parameters per module at 768.

Both use ``nn.MultiheadAttention(batch_first=True)``; :func:`branch_parameter_counts` splits a
module's parameters into its visual (``*_v``) and text (``*_t``) branches.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GatedPromptFusion", "ReleasedPromptFusion", "branch_parameter_counts"]


def _projection(width_in: int, width_out: int) -> nn.Module:
    return nn.Identity() if width_in == width_out else nn.Linear(width_in, width_out)


def _ffn(dim: int, mult: float, dropout: float) -> nn.Sequential:
    hidden = max(1, round(dim * mult))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


def _check(dim: int, heads: int, ffn_mult: float, dropout: float) -> None:
    if dim < 1:
        raise ValueError(f"fusion_dim must be ≥ 1, got {dim}")
    if heads < 1 or dim % heads:
        raise ValueError(f"fusion_heads={heads} must be ≥ 1 and divide fusion_dim={dim}")
    if not ffn_mult > 0:
        raise ValueError(f"fusion_ffn_mult must be > 0, got {ffn_mult}")
    if not 0 <= dropout < 1:
        raise ValueError(f"fusion_dropout must be in [0, 1), got {dropout}")


class GatedPromptFusion(nn.Module):
    """Pre-LN gated bidirectional cross-attention that starts near the identity (see module docstring).

    Args:
        visual_width, text_width: widths of the two streams (ViT width, word-embedding width).
        dim: inner width (``None`` = ``visual_width``); projections are added where a stream's
            width differs.
        heads: attention heads (must divide ``dim``).
        ffn_mult: FFN hidden width = ``ffn_mult · dim``.
        dropout: dropout in the attentions and the FFNs.
        gate_bias: initial bias ``b`` of the gates (their weights start at zero).
        ffn_out_init_std: std of the FFN output layer's initial weights (bias zero).
    """

    def __init__(self, visual_width: int, text_width: int, dim: int | None = None, *, heads: int = 4,
                 ffn_mult: float = 4.0, dropout: float = 0.0, gate_bias: float = -6.0,
                 ffn_out_init_std: float = 1e-5):
        super().__init__()
        dim = int(visual_width if dim is None else dim)
        _check(dim, heads, ffn_mult, dropout)
        self.dim = dim
        self.norm_v, self.norm_t = nn.LayerNorm(visual_width), nn.LayerNorm(text_width)
        self.in_v, self.in_t = _projection(visual_width, dim), _projection(text_width, dim)
        self.attn_v = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_t = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.gate_v, self.gate_t = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
        self.ffn_v, self.ffn_t = _ffn(dim, ffn_mult, dropout), _ffn(dim, ffn_mult, dropout)
        self.out_v, self.out_t = _projection(dim, visual_width), _projection(dim, text_width)
        with torch.no_grad():
            for gate in (self.gate_v, self.gate_t):
                gate.weight.zero_()
                gate.bias.fill_(gate_bias)
            for ffn in (self.ffn_v, self.ffn_t):
                nn.init.normal_(ffn[3].weight, std=ffn_out_init_std)
                ffn[3].bias.zero_()
            for out in (self.out_v, self.out_t):  # a default bias would shift every token at init
                if isinstance(out, nn.Linear):
                    out.bias.zero_()

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v', t')`` for ``v`` [B, Nv, Wv] and ``t`` [B, Nt, Wt]."""
        u_v = self.in_v(self.norm_v(v))
        u_t = self.in_t(self.norm_t(t.to(v.dtype)))
        # Text reads the image ...
        a_t = self.attn_t(u_t, u_v, u_v, need_weights=False)[0]
        d_t = torch.sigmoid(self.gate_t(torch.cat([u_t, a_t], dim=-1))) * a_t + self.ffn_t(u_t)
        t_out = t + self.out_t(d_t).to(t.dtype)
        # ... then the image reads that image-informed text jointly with its own tokens.
        u_t = self.in_t(self.norm_t(t_out.to(v.dtype)))
        context = torch.cat([u_t.to(u_v.dtype), u_v], dim=1)
        a_v = self.attn_v(u_v, context, context, need_weights=False)[0]
        d_v = torch.sigmoid(self.gate_v(torch.cat([u_v, a_v], dim=-1))) * a_v + self.ffn_v(u_v)
        return v + self.out_v(d_v).to(v.dtype), t_out


class ReleasedPromptFusion(nn.Module):
    """The released ``CrossModalPromptFusion`` (``biomed-methods.md`` §5.3), default PyTorch inits.

    Args:
        visual_width, text_width: widths of the two streams.
        dim: unified width (``None`` = ``visual_width``; 768 = 768 = 768 for BiomedCLIP, where the
            in/out projections are identities, as released).
        heads, ffn_mult, dropout: 8, 4, 0.1 as released.
    """

    def __init__(self, visual_width: int, text_width: int, dim: int | None = None, *, heads: int = 8,
                 ffn_mult: float = 4.0, dropout: float = 0.1):
        super().__init__()
        dim = int(visual_width if dim is None else dim)
        _check(dim, heads, ffn_mult, dropout)
        self.dim = dim
        self.in_v, self.in_t = _projection(visual_width, dim), _projection(text_width, dim)
        self.attn_v = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)  # v → t
        self.attn_t = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)  # t → v
        self.gate_v, self.gate_t = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_v, self.norm_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn_v, self.ffn_t = _ffn(dim, ffn_mult, dropout), _ffn(dim, ffn_mult, dropout)
        self.out_v, self.out_t = _projection(dim, visual_width), _projection(dim, text_width)

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v', t')`` for ``v`` [B, Nv, Wv] and ``t`` [B, Nt, Wt]."""
        v = self.in_v(v)
        t = self.in_t(t.to(v.dtype))
        a_v = self.attn_v(v, t, t, need_weights=False)[0]
        a_t = self.attn_t(t, v, v, need_weights=False)[0]
        g_v, g_t = torch.sigmoid(self.gate_v(v)), torch.sigmoid(self.gate_t(t))
        v_bar = self.norm_v(v + g_v * v + (1 - g_v) * a_v)
        t_bar = self.norm_t(t + g_t * t + (1 - g_t) * a_t)
        return self.out_v(v_bar + self.ffn_v(v_bar)), self.out_t(t_bar + self.ffn_t(t_bar))


def branch_parameter_counts(module: nn.Module) -> dict[str, int]:
    """``{"visual": n, "text": n, "total": n}``: parameters of the ``*_v`` and ``*_t`` submodules."""
    counts = {"visual": 0, "text": 0}
    for name, param in module.named_parameters():
        branch = name.split(".", 1)[0]
        counts["visual" if branch.endswith("_v") else "text"] += param.numel()
    counts["total"] = counts["visual"] + counts["text"]
    return counts
