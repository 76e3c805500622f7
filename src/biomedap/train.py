"""``fit``: one training loop for every gradient-trained method, and ``predict_logits``.

Reproduces the published Dassl loop where it matters: SGD (momentum 0.9, weight decay 5e-4),
cosine schedule stepped per epoch after a constant warm-up epoch at 1e-5 (or per iteration for
the LP++-style harness), random batches with ``drop_last`` only when a full batch exists, the
last epoch's weights evaluated.  Batch order is drawn from a generator seeded by (seed, epoch),
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import OptimConfig, lr_at
from .methods.base import Batch, Method

log = logging.getLogger(__name__)


@dataclass
class FeatureTrainData:
    """Cached training set: ``views[e % V]`` are the image features (or tokens) used in epoch ``e``.

    ``kind="features"``: views [V, N, D] of normalised features, batches carry ``features``.
    ``kind="tokens"``: views [V, N, T, width] of tokens entering the method's ``prefix_block``,
    batches carry ``tokens``.
    """

    views: torch.Tensor  # V = epochs (faithful) or a smaller pool
    labels: torch.Tensor  # [N]
    extra: dict[str, torch.Tensor] | None = None  # named extra views, each [V', N, D] (Method.extra_views)
    kind: str = "features"

    def __post_init__(self):
        if self.kind not in ("features", "tokens"):
            raise ValueError(f"kind must be 'features' or 'tokens', got {self.kind!r}")
        if self.views.dim() == (2 if self.kind == "features" else 3):
            self.views = self.views.unsqueeze(0)
        if self.views.shape[1] != self.labels.shape[0]:
            raise ValueError(f"{self.views.shape[1]} feature rows but {self.labels.shape[0]} labels")
        if self.labels.numel() == 0:
            raise ValueError("the training set is empty")
        for name, extra in (self.extra or {}).items():
            if extra.dim() != 3 or extra.shape[1] != self.labels.shape[0]:
                raise ValueError(f"extra view {name!r} has shape {tuple(extra.shape)}; expected [V, "
                                 f"{self.labels.shape[0]}, D]")

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, epoch: int, index: torch.Tensor) -> Batch:
        view = self.views[epoch % self.views.shape[0]]
        extra = None if not self.extra else {name: views[epoch % views.shape[0]][index]
                                             for name, views in self.extra.items()}
        return Batch(labels=self.labels[index], extra=extra, **{self.kind: view[index]})


@dataclass
class FitResult:
    epochs: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, lr, losses, seconds
    resumed_from_epoch: int | None = None


def steps_per_epoch(num_samples: int, optim: OptimConfig) -> tuple[int, int]:
    """(steps, batch size) of one epoch under the ``drop_last`` policy."""
    batch = optim.batch_size
    drop = optim.drop_last == "always" or (optim.drop_last == "auto" and num_samples >= batch)
    steps = num_samples // batch if drop else math.ceil(num_samples / batch)
    return steps, batch


def make_optimizer(optim: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.adam_betas), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 otherwise (bf16 on this CPU is ~7x slower)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fit(
    method: Method,
    data: FeatureTrainData,
    optim: OptimConfig,
    *,
    seed: int = 1,
    precision: str = "fp32",
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 1,
    progress: bool = False,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``method``'s trainable tensors; returns per-epoch losses.

    With ``checkpoint_path`` the learned state, optimiser state and epoch are saved every
    ``checkpoint_every`` epochs (atomically), and an existing checkpoint is resumed from.
    """
    params = method.trainable_parameters()
    if not params:
        raise ValueError(f"{method.name} has no trainable parameters; nothing to fit")
    device = method.backbone.device
    optimizer = make_optimizer(optim, params)
    n_steps, batch_size = steps_per_epoch(data.num_samples, optim)
    if n_steps == 0:
        raise ValueError(f"{data.num_samples} training samples cannot fill a batch of {batch_size} with drop_last")

    start_epoch, resumed = 0, None
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.is_file():
        start_epoch = _load_checkpoint(checkpoint_path, method, optimizer)
        resumed = start_epoch
        log.info("resuming %s from epoch %d (%s)", method.name, start_epoch, checkpoint_path)

    result = FitResult(epochs=optim.epochs, steps=0, seconds=0.0, resumed_from_epoch=resumed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=optim.epochs, initial=start_epoch, desc=f"training {method.name}", unit="epoch", leave=False)
    started = time.perf_counter()
    # Draws inside a step (text dropout) use the global RNG: seeded per (seed, epoch) below so that a
    # run is reproducible and a resumed run matches an uninterrupted one; the caller's state is restored.
    method.train()
    rng = contextlib.ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    try:
        for epoch in range(start_epoch, optim.epochs):
            epoch_start = time.perf_counter()
            torch.manual_seed(2 * (seed * 1_000_003 + epoch) + 1)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(data.num_samples, generator=generator)
            totals: dict[str, float] = {}
            lr = lr_at(optim, epoch)
            for step in range(n_steps):
                if optim.schedule_step == "iteration":
                    lr = lr_at(optim, epoch, step, n_steps)
                _set_lr(optimizer, lr)
                index = order[step * batch_size:(step + 1) * batch_size]
                batch = data.batch(epoch, index).to(device)
                with autocast_for(device, precision):
                    losses = method.train_step(batch, optimizer, optim.grad_clip)
                for key, value in losses.items():
                    if not math.isfinite(value):
                        raise FloatingPointError(f"{method.name}: {key} became {value} at epoch {epoch}, step {step}")
                    totals[key] = totals.get(key, 0.0) + value
                result.steps += 1
            row = {"epoch": epoch, "lr": lr, **{k: v / n_steps for k, v in totals.items()},
                   "seconds": time.perf_counter() - epoch_start}
            result.history.append(row)
            last = epoch + 1 == optim.epochs
            if checkpoint_path and ((epoch + 1) % checkpoint_every == 0 or last):
                _save_checkpoint(checkpoint_path, method, optimizer, epoch + 1)
            # After the checkpoint: whatever the callback records (a log line) is already resumable.
            if on_epoch_end is not None:
                on_epoch_end(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                bar.update(1)
    finally:
        rng.close()
        method.eval()
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _save_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, next_epoch: int) -> None:
    import io

    from .io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save({"state": method.learned_state(), "optimizer": optimizer.state_dict(), "next_epoch": next_epoch},
               buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    method.load_learned_state(payload["state"])
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["next_epoch"])


@torch.no_grad()
def predict_logits(
    method: Method,
    features: torch.Tensor,
    *,
    chunk_size: int = 4096,
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits [N, C] of a feature-space method from normalised image features [N, D]."""
    method.eval()
    device = method.backbone.device
    outputs = []
    for start in range(0, features.shape[0], chunk_size):
        with torch.no_grad(), autocast_for(device, precision):
            logits = method(Batch(features=features[start:start + chunk_size].to(device)))
        outputs.append(logits.float().cpu())
    if not outputs:
        return torch.empty(0, len(method.classnames))
    return torch.cat(outputs)
