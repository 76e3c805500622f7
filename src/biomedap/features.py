"""Content-addressed cache of frozen image features.

One image pass per (backbone, image, view), shared by every method, shot count, seed and process
that needs it.  Layout::

    CACHE_ROOT/<backbone fingerprint>/<transform fingerprint>/
        shard-<id>.safetensors   fp32 features, one tensor per entry
        shard-<id>.json          manifest: the entry keys + what produced them (written last)

The key of an entry is the SHA-256 of the image file's bytes plus, for augmented views, the view's
seed and index — never a path or mtime, so caches survive copies and work across cluster nodes.
The backbone fingerprint covers architecture, weights and preprocessing; the transform
fingerprint covers the augmentation spec and precision.  A shard becomes visible only when its
manifest exists, and both are written atomically, so killing an extraction leaves no readable
partial entry and a rerun encodes only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import __version__
from .data.transforms import AugmentSpec, augmented_view, build_eval_transform, load_image, view_seed
from .io import atomic_save_safetensors, atomic_write_json, bytes_sha256, json_fingerprint

if TYPE_CHECKING:
    from .backbone import Backbone
    from .data.sources import Sample

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1
DEFAULT_SHARD_SIZE = 256
_RACY_NS = 2_000_000_000  # files changed this recently are re-hashed on every call


def default_cache_dir() -> Path:
    """``$BIOMEDAP_CACHE`` or ``~/.cache/biomedap/features``."""
    env = os.environ.get("BIOMEDAP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "biomedap" / "features"


@dataclass(frozen=True)
class ViewSpec:
    """Which view of an image: the eval transform (``augment=None``) or augmented view ``index``.

    An augmented view's crop is drawn from a generator seeded by (image hash, ``seed``, ``index``),
    so the same view of the same image is identical in every process and every run that asks for it.
    """

    augment: AugmentSpec | None = None
    seed: int = 0
    index: int = 0

    @property
    def is_eval(self) -> bool:
        return self.augment is None or self.augment.kind == "none"

    def transform_fingerprint(self) -> str:
        return "eval" if self.is_eval else self.augment.fingerprint()

    def entry_suffix(self) -> str:
        return "" if self.is_eval else f":s{self.seed}v{self.index}"


def eval_view() -> ViewSpec:
    return ViewSpec()


def train_views(augment: AugmentSpec, seed: int, count: int) -> list[ViewSpec]:
    """``count`` augmented views of run ``seed``: view ``e`` serves epoch ``e`` (or ``e mod count``)."""
    return [ViewSpec(augment, seed, i) for i in range(count)]


@dataclass(frozen=True)
class TokenPrefix:
    """Encode tokens entering ViT block ``block`` instead of pooled features.

    For token-space methods (visual prompts, fusion): blocks ``0 .. block-1`` are frozen, run with
    the fixed ``hook`` (named ``hook_name``, which enters the cache namespace; ``"plain"`` = no
    hook). Entries are [T, width] per image and view, not normalised.
    """

    block: int
    hook_name: str = "plain"
    hook: Callable | None = field(default=None, compare=False, repr=False)

    def fingerprint(self) -> dict:
        return {"tokens_at_block": self.block, "hook": self.hook_name}


class FeatureCache:
    """Feature store under ``root`` (see module docstring).  Cheap to create; safe to share."""

    def __init__(self, root: str | os.PathLike | None = None, *, shard_size: int = DEFAULT_SHARD_SIZE):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.shard_size = shard_size
        self._image_hashes: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    # ----------------------------------------------------------------- keys
    def image_sha256(self, path: str | os.PathLike) -> str:
        """SHA-256 of the file's bytes, memoised per (path, size, mtime, ctime, inode) within this instance.

        ctime and inode catch rewrites that keep size and mtime (``cp -p``, ``rsync -a``, ``os.utime``);
        a file changed in the last seconds is not memoised, since it could change again within the
        same timestamp tick (git's "racy" rule).
        """
        path = os.fspath(path)
        try:
            stat = os.stat(path)
        except OSError as err:
            raise FileNotFoundError(f"image not found: {path}") from err
        signature = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        memo = self._image_hashes.get(path)
        if memo and memo[0] == signature:
            return memo[1]
        with open(path, "rb") as handle:
            digest = bytes_sha256(handle.read())
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > _RACY_NS:
            self._image_hashes[path] = (signature, digest)
        return digest

    def namespace(self, backbone: Backbone, view: ViewSpec, precision: str = "fp32",
                  prefix: TokenPrefix | None = None) -> Path:
        transform = {"schema": CACHE_SCHEMA, "view": view.transform_fingerprint(), "precision": precision}
        if prefix is not None:  # token entries live apart from features (features' keys are unchanged)
            transform["prefix"] = prefix.fingerprint()
        return self.root / backbone.identity.fingerprint / json_fingerprint(transform)[:20]

    # ----------------------------------------------------------------- storage
    def _index(self, namespace: Path) -> dict[str, Path]:
        index: dict[str, Path] = {}
        if not namespace.is_dir():
            return index
        for manifest in sorted(namespace.glob("shard-*.json")):
            shard = manifest.with_suffix(".safetensors")
            try:
                keys = json.loads(manifest.read_text(encoding="utf-8"))["keys"]
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring unreadable cache manifest %s (%s)", manifest, err)
                continue
            if shard.is_file():
                for key in keys:
                    index[key] = shard
        return index

    def lookup(self, namespace: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached entries among ``keys`` (missing ones are simply absent)."""
        from safetensors import safe_open

        index = self._index(namespace)
        by_shard: dict[Path, list[str]] = {}
        for key in set(keys):
            if key in index:
                by_shard.setdefault(index[key], []).append(key)
        found: dict[str, torch.Tensor] = {}
        for shard, shard_keys in by_shard.items():
            with safe_open(str(shard), framework="pt") as handle:
                for key in shard_keys:
                    found[key] = handle.get_tensor(key)
        return found

    def store(self, namespace: Path, entries: dict[str, torch.Tensor], info: dict) -> None:
        """Write one shard, then its manifest (the commit point)."""
        if not entries:
            return
        namespace.mkdir(parents=True, exist_ok=True)
        stem = namespace / f"shard-{uuid.uuid4().hex[:16]}"
        tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in entries.items()}
        atomic_save_safetensors(stem.with_suffix(".safetensors"), tensors)
        atomic_write_json(stem.with_suffix(".json"),
                          {"keys": list(tensors), "count": len(tensors), "biomedap": __version__, **info})

    def check_is_cache(self) -> None:
        """Raise ``ValueError`` unless ``root`` holds only cache files.

        The layout is ``<fingerprint>/<transform>/shard-*`` (and hidden temporary files); anything
        else means the path is not a feature cache, so nothing must be deleted there.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"{self.root} is not a directory; nothing was deleted")
        for path in self.root.rglob("*") if self.root.exists() else ():
            parts = path.relative_to(self.root).parts
            stray = (len(parts) > 2) if path.is_dir() else (
                len(parts) != 3 or not parts[-1].startswith(("shard-", ".")))
            if stray:
                raise ValueError(
                    f"{self.root} does not look like a biomedap feature cache (it holds {path}); nothing was "
                    "deleted. Check the cache directory, or delete the folder by hand if you are sure."
                )

    def clear(self) -> None:
        """Delete every cached feature under ``root`` (after :meth:`check_is_cache`)."""
        import shutil

        self.check_is_cache()
        if self.root.exists():
            shutil.rmtree(self.root)

    def stats(self) -> dict:
        """Number of entries and bytes per backbone fingerprint."""
        out: dict[str, dict] = {}
        if not self.root.is_dir():
            return out
        for backbone_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            entries = size = 0
            for manifest in backbone_dir.glob("*/shard-*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    entries += json.loads(manifest.read_text(encoding="utf-8"))["count"]
                shard = manifest.with_suffix(".safetensors")
                size += shard.stat().st_size if shard.exists() else 0
            out[backbone_dir.name] = {"entries": entries, "bytes": size}
        return out


class _ViewDataset(torch.utils.data.Dataset):
    """(path, view, image hash) -> pixels; a Dataset so that images decode in worker processes."""

    def __init__(self, items: list[tuple[str, ViewSpec, str]], preprocess):
        self.items = items
        self.preprocess = preprocess
        self.eval_transform = build_eval_transform(preprocess)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        path, view, image_sha = self.items[index]
        image = load_image(path)
        if view.is_eval:
            return self.eval_transform(image)
        # The crop depends only on the image content and the view, not on its position in a dataset.
        return augmented_view(image, view.augment, self.preprocess, view_seed(view.seed, view.index, image_sha))


class _NoCache(FeatureCache):
    """A cache that never finds nor keeps anything."""

    def __init__(self):
        super().__init__(root=os.devnull)

    def lookup(self, namespace, keys):
        return {}

    def store(self, namespace, entries, info):
        return None


def encode_samples(
    backbone: Backbone,
    paths: Sequence[str] | Sequence[Sample],
    views: ViewSpec | Sequence[ViewSpec] = ViewSpec(),
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    precision: str = "fp32",
    num_workers: int = 0,
    normalize: bool = True,
    progress: bool | Callable = False,
    desc: str = "encoding images",
    prefix: TokenPrefix | None = None,
) -> torch.Tensor:
    """Frozen image features of ``paths`` under each view: [N, D] for one view, [V, N, D] for a list.

    Cached entries are read; missing ones are encoded in batches and written shard by shard
    (every ``cache.shard_size`` images), so an interrupted extraction keeps what it finished.
    ``cache=None`` encodes everything and stores nothing.  ``num_workers`` > 0 decodes and
    transforms images in that many worker processes.  With ``prefix``, the tokens entering block
    ``prefix.block`` are encoded instead ([N, T, width] / [V, N, T, width], never normalised).
    """
    single = isinstance(views, ViewSpec)
    view_list = [views] if single else list(views)
    paths = [p.path if hasattr(p, "path") else os.fspath(p) for p in paths]
    if cache is None:  # encode everything, store nothing (e.g. new images given to `predict`)
        cache = _NoCache()
    hashes = [cache.image_sha256(p) for p in paths]
    # bf16 autocast only exists on CUDA; elsewhere the features are fp32 and share fp32's entries.
    precision = "bf16" if precision == "bf16" and backbone.device.type == "cuda" else "fp32"
    if prefix is None:
        entry_shape: tuple[int, ...] = (backbone.embed_dim,)
    else:
        backbone.validate_block_indices([prefix.block], "prefix block", allow_depth=True)
        entry_shape = (backbone.vision.num_tokens, backbone.vision.width)
        normalize = False
    out = torch.empty(len(view_list), len(paths), *entry_shape, dtype=torch.float32)

    # All views of one augmentation share a namespace: look each namespace up once.
    wanted: dict[Path, list[tuple[int, int, str]]] = {}
    for v, view in enumerate(view_list):
        namespace = cache.namespace(backbone, view, precision, prefix)
        wanted.setdefault(namespace, []).extend((v, i, h + view.entry_suffix()) for i, h in enumerate(hashes))
    todo: list[tuple[int, int, str, Path]] = []  # (view idx, image idx, key, namespace), one per distinct key
    duplicates: list[tuple[int, int, int, int]] = []  # (view, image) that repeats an encoded (view, image)
    for namespace, entries in wanted.items():
        found = cache.lookup(namespace, [key for _, _, key in entries])
        scheduled: dict[str, tuple[int, int]] = {}
        for v, i, key in entries:
            if key in found:
                out[v, i] = found[key]
            elif key in scheduled:  # the same image listed twice: encode it once
                duplicates.append((v, i, *scheduled[key]))
            else:
                scheduled[key] = (v, i)
                todo.append((v, i, key, namespace))

    if todo:
        bar = _progress_bar(progress, len(todo), desc)
        pending: dict[Path, dict[str, torch.Tensor]] = {}
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if precision == "bf16" and backbone.device.type == "cuda" else contextlib.nullcontext())
        loader = torch.utils.data.DataLoader(
            _ViewDataset([(paths[i], view_list[v], hashes[i]) for v, i, _, _ in todo], backbone.preprocess),
            batch_size=batch_size, shuffle=False, num_workers=num_workers,
        )
        for start, pixels in zip(range(0, len(todo), batch_size), loader):
            chunk = todo[start:start + batch_size]
            with torch.no_grad(), autocast:
                if prefix is None:
                    features = backbone.encode_image(pixels).float().cpu()
                else:
                    features = backbone.encode_image_prefix(pixels, prefix.block, hook=prefix.hook).float().cpu()
            for (v, i, key, namespace), feature in zip(chunk, features):
                out[v, i] = feature
                pending.setdefault(namespace, {})[key] = feature
            for namespace, entries in list(pending.items()):
                if len(entries) >= cache.shard_size:
                    cache.store(namespace, entries, _shard_info(backbone, view_list, precision))
                    pending.pop(namespace)
            if bar is not None:
                bar.update(len(chunk))
        for namespace, entries in pending.items():
            cache.store(namespace, entries, _shard_info(backbone, view_list, precision))
        if bar is not None:
            bar.close()
    for v, i, source_v, source_i in duplicates:
        out[v, i] = out[source_v, source_i]

    if normalize:
        out = F.normalize(out, dim=-1)
    return out[0] if single else out


TEXT_NAMESPACE = "text"


def encode_texts(
    backbone: Backbone,
    texts: Sequence[str],
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Normalised frozen text features [N, D] of ``texts`` (eval mode, no gradients), cached.

    For fixed teacher text such as description banks: each distinct text is encoded once per
    backbone and stored under ``CACHE_ROOT/<backbone fingerprint>/text/`` keyed by the SHA-256 of
    the text, so every run, seed and method that needs the same sentences reads them back.
    Texts are encoded in length-sorted batches (padding to the longest text of each batch).
    Always fp32: teacher targets do not follow the run's autocast.
    """
    texts = list(texts)
    if cache is None:
        cache = _NoCache()
    keys = [bytes_sha256(text.encode("utf-8")) for text in texts]
    namespace = cache.root / backbone.identity.fingerprint / TEXT_NAMESPACE
    found = cache.lookup(namespace, keys)
    missing = sorted({key: text for key, text in zip(keys, texts) if key not in found}.items(),
                     key=lambda item: len(item[1]))
    if missing:
        new: dict[str, torch.Tensor] = {}
        with torch.no_grad(), backbone.text_dropout(False):
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                features = backbone.encode_text([text for _, text in chunk]).float().cpu()
                new.update({key: feature for (key, _), feature in zip(chunk, features)})
        cache.store(namespace, new, {"backbone": backbone.identity.to_dict(), "kind": "text", "schema": CACHE_SCHEMA})
        found.update(new)
    out = torch.stack([found[key] for key in keys]) if keys else torch.empty(0, backbone.embed_dim)
    return F.normalize(out.float(), dim=-1)


def _shard_info(backbone: Backbone, views: Sequence[ViewSpec], precision: str) -> dict:
    return {
        "backbone": backbone.identity.to_dict(),
        "transforms": sorted({v.transform_fingerprint() for v in views}),
        "precision": precision,
        "schema": CACHE_SCHEMA,
    }


def _progress_bar(progress: bool | Callable, total: int, desc: str):
    if not progress:
        return None
    if callable(progress):
        return progress(total=total, desc=desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)
