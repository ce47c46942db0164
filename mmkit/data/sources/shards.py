"""Image–text samples streamed from WebDataset-format tar shards.

Reads the tar files with the standard library (not the ``webdataset`` package), so behaviour does
not depend on which webdataset version is installed, while staying compatible with its format:
members are grouped into samples by key (the member name up to the first dot of its basename),
e.g. ``000017.jpg`` + ``000017.txt`` + ``000017.cls``.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import math
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from mmkit import distributed
from mmkit.config_checks import Range, check_settings
from mmkit.data.sample import BadSample, caption_too_long, clean_caption, decode_image, make_sample
from mmkit.data.sources.shard_streams import StopReading, check_reader, is_remote, local_path, open_shard

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # same split rule as webdataset's base_plus_ext
_MAX_EMPTY_DRAWS = 1000  # resampling shards that hold no samples would otherwise spin forever
# A member larger than this is not read into memory: its sample is skipped and counted (a 300 MiB
# "image" would otherwise be read whole by every worker that meets it, before being rejected).
MAX_MEMBER_BYTES = 64 * 2**20


class WebDatasetShards(IterableDataset):
    """Iterable dataset over WebDataset tar shards, split across ranks and DataLoader workers.

    Without ``resampled`` every shard is read once per epoch by exactly one (rank, worker) reader,
    so each sample is seen once; there must be at least ranks x workers shards. With ``resampled``
    each reader draws shards with replacement forever and ``samples_per_epoch`` sets the epoch.

    Multi-rank training needs every rank to yield the same number of batches (DDP would hang
    otherwise): set ``samples_per_epoch`` — readers then stop (or cycle over their shards) at an
    equal per-rank quota. A single pass without it yields whatever each reader's shards hold.

    ``index`` of a sample is ``shard_number * index_stride + position_in_shard``, where
    shard_number counts the expanded shard list of all sources in the order given, so it is
    stable across epochs, ranks and worker counts.

    Args:
        urls: Shards, one entry per source. An entry may be a brace pattern
            ("data/train-{000..099}.tar"), a glob, or several of these joined by "::" (as in
            webdataset); several entries make a mixture. Besides local paths, shards may be
            ``pipe:`` shell commands writing a tar to standard output
            ("pipe:aws s3 cp s3://bucket/train-{000..099}.tar -") or fsspec URLs: ``s3://``
            (needs s3fs), ``gs://`` (gcsfs), ``http(s)://``. These are brace-expanded, never
            globbed; the first one must open when the dataset is built, later ones that fail are
            skipped and counted like missing local shards.
        weights: Sampling weight per source (relative). Default: proportional to each source's
            number of shards.
        resampled: Draw shards with replacement, forever; requires ``samples_per_epoch``.
        samples_per_epoch: Samples per epoch over all ranks (split evenly; the remainder of a
            division by the world size is dropped so every rank gets the same count).
        shuffle_shards: Shuffle the shard order each epoch (seeded by ``seed`` and the epoch).
            Turn off for evaluation.
        shuffle_buffer: Size of a sample shuffle buffer per reader (0 = off). Holds raw bytes.
        seed: Base seed for shard order, resampling, mixing and the shuffle buffer.
        caption_ext: Member extension holding the caption text.
        image_exts: Member extensions tried, in order, for the image.
        index_stride: Multiplier that keeps ``index`` unique; must exceed samples per shard.
        class_names: Names of the integer labels in ``.cls`` members (or a ``.json`` member's
            ``label``), label i being ``class_names[i]``, as a list or a text file with one name
            per line (open_clip's classnames files). Zero-shot evaluation scores with them.
        storage_options: Options for fsspec's filesystem of URL shards, e.g. ``{"anon": true}``
            for a public S3 bucket or ``{"endpoint_url": ...}``; credentials come from the usual
            places (environment, ~/.aws, gcloud) without them.
    """

    setting_ranges = {
        "weights": Range(ge=0, each=True, none="by shard count"),
        "samples_per_epoch": Range(ge=1, integer=True, none="one pass over the shards"),
        "shuffle_buffer": Range(ge=0, integer=True),
        "seed": Range(ge=0, integer=True),  # numpy's SeedSequence takes non-negative seeds only
        "index_stride": Range(ge=1, integer=True),
    }

    def __init__(
        self,
        urls: str | list[str],
        weights: list[float] | None = None,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        caption_ext: str = "txt",
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        index_stride: int = 1_000_000,
        class_names: list[str] | str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        check_settings(self, locals(), WebDatasetShards.setting_ranges)
        sources = [urls] if isinstance(urls, str) else list(urls)
        if not sources:
            raise ValueError("WebDatasetShards: no urls given")
        self.storage_options = dict(storage_options or {})
        self.shards_per_source = [_expand(s, self.storage_options) for s in sources]
        # (global shard number, source number, path): the numbering defines `index`
        self.shards = [
            (i, k, path)
            for i, (k, path) in enumerate((k, p) for k, paths in enumerate(self.shards_per_source) for p in paths)
        ]
        if weights is None:
            weights = [float(len(p)) for p in self.shards_per_source]
        if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"WebDatasetShards: need one non-negative weight per source ({len(sources)}), got {weights}"
            )
        if resampled and samples_per_epoch is None:
            raise ValueError("WebDatasetShards: resampled=True streams forever; set samples_per_epoch")
        self.weights = [float(w) for w in weights]
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.caption_ext = caption_ext.lower()
        self.image_exts = [e.lower() for e in image_exts]
        self.index_stride = index_stride
        self.class_names = _class_names(class_names)
        self.rank: int | None = None
        self.world_size: int | None = None
        self.batch_size: int | None = None
        self._epoch = 0
        self._shared_epoch: Any = None

    # -- configuration from the loader (main process, before workers start) -----------------
    def set_distributed(self, rank: int, world_size: int, batch_size: int | None = None) -> None:
        """Which rank reads, out of how many; with ``batch_size`` the per-worker quotas are
        whole batches, so the DataLoader's length is exact."""
        if not 0 <= rank < world_size:
            raise ValueError(f"WebDatasetShards: rank {rank} not in [0, {world_size})")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self._ensure_shared_epoch()

    def set_epoch(self, epoch: int) -> None:
        """Reseeds shard order and resampling. Shared memory so persistent workers see it too."""
        self._ensure_shared_epoch()
        self._shared_epoch.value = epoch

    @property
    def epoch(self) -> int:
        return self._shared_epoch.value if self._shared_epoch is not None else self._epoch

    def _ensure_shared_epoch(self) -> None:
        # Created lazily: a multiprocessing.Value cannot be deep-copied, and config systems may
        # deep-copy a dataset before it is configured.
        if self._shared_epoch is None:
            self._shared_epoch = multiprocessing.Value("q", self._epoch)

    def check_split(self, world_size: int, num_workers: int) -> None:
        """Raise a clear error now, in the main process, instead of inside a worker later."""
        readers = world_size * max(1, num_workers)
        if not self.resampled and len(self.shards) < readers:
            raise ValueError(
                f"WebDatasetShards: {len(self.shards)} shard(s) cannot be split across {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) = {readers} readers without duplicating data; use at least "
                f"{readers} shards, fewer workers, or resampled=True"
            )

    # -- iteration (inside each DataLoader worker) ---------------------------------------------
    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            raise TypeError("WebDatasetShards has no length without samples_per_epoch")
        return self.samples_per_epoch // self._rank_world()[1]

    def __iter__(self) -> Iterator[dict[str, Any] | BadSample]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_split(world, workers)
        reader, readers = rank * workers + worker, world * workers
        epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch, reader])

        if self.resampled:
            streams = [self._resampled_stream(paths, rng) for paths in self._shards_by_source(self.shards)]
        else:
            order = list(self.shards)
            if self.shuffle_shards:
                # same permutation on every reader, so the strided split below stays disjoint
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            mine = order[reader::readers]
            cycle = self.samples_per_epoch is not None
            streams = [self._pass_stream(paths, rng, cycle) for paths in self._shards_by_source(mine)]

        raw = _mix(streams, self.weights, rng)
        if self.shuffle_buffer > 1:
            raw = _shuffle(raw, self.shuffle_buffer, rng)
        quota = self._quota(rank, world, worker, workers)
        if quota is not None:
            raw = itertools.islice(raw, quota)
        for item in raw:
            yield item if isinstance(item, BadSample) else self._decode(*item)

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return distributed.rank(), distributed.world_size()

    def _quota(self, rank: int, world: int, worker: int, workers: int) -> int | None:
        """Samples this worker yields; equal per rank. With a known batch size, workers get whole
        batches (round-robin, as the DataLoader reads them) and only one partial batch exists."""
        if self.samples_per_epoch is None:
            return None
        per_rank = self.samples_per_epoch // world
        b = self.batch_size
        if not b:
            return per_rank // workers + (worker < per_rank % workers)
        num_batches = math.ceil(per_rank / b)
        mine = range(worker, num_batches, workers)
        short = num_batches * b - per_rank  # the last batch is this much smaller
        return len(mine) * b - (short if num_batches - 1 in mine else 0)

    def _shards_by_source(self, shards: list[tuple[int, int, str]]) -> list[list[tuple[int, str]]]:
        by_source: list[list[tuple[int, str]]] = [[] for _ in self.shards_per_source]
        for number, source, path in shards:
            by_source[source].append((number, path))
        return by_source

    def _pass_stream(self, shards: list[tuple[int, str]], rng: np.random.Generator, cycle: bool) -> Iterator:
        """This reader's shards once, or over and over (reshuffled) when an epoch quota must be met."""
        while True:
            produced = False
            for number, path in shards:
                for item in self._read_shard(number, path):
                    produced = True
                    yield item
            if not cycle or not produced:
                return
            shards = list(shards)
            rng.shuffle(shards)

    def _resampled_stream(self, shards: list[tuple[int, str]], rng: np.random.Generator) -> Iterator:
        empty_draws = 0
        while shards:
            number, path = shards[rng.integers(len(shards))]
            produced = False
            for item in self._read_shard(number, path):
                produced = True
                yield item
            empty_draws = 0 if produced else empty_draws + 1
            if empty_draws >= _MAX_EMPTY_DRAWS:
                raise RuntimeError(f"WebDatasetShards: {_MAX_EMPTY_DRAWS} shard draws in a row held no samples")

    def _read_shard(self, number: int, path: str) -> Iterator[tuple | BadSample]:
        """Raw samples (where, index, key, {ext: bytes}) of one shard, in order. A broken shard ends
        with a BadSample instead of an exception: the bytes after a truncation are lost anyway."""
        key, parts, position = None, {}, 0
        try:
            with open_shard(path, self.storage_options) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                # streaming mode: no seeking, so pipes and URLs read the same way as files
                for member in tar:
                    if not member.isfile():
                        continue
                    m = _KEY_EXT.match(member.name)
                    if m is None:
                        continue
                    if m.group(1) != key and key is not None:
                        yield self._raw(path, number, position, key, parts)
                        position, parts = position + 1, {}
                    key = m.group(1)
                    # An oversized member is passed over unread (the stream skips it in blocks).
                    parts[m.group(2).lower()] = (tar.extractfile(member).read() if member.size <= MAX_MEMBER_BYTES
                                                 else _Unread(member.size))
                last = key
                if key is not None:
                    yield self._raw(path, number, position, key, parts)
                    key, position = None, position + 1
                if getattr(tar.fileobj, "comptype", None) == "tar" and not stream.has_end_of_archive(tar.offset):
                    after = f"after sample {last!r} (#{position - 1})" if last is not None else "before its first sample"
                    yield BadSample(f"{path}: ends {after} without tar's end-of-archive blocks: the shard is "
                                    "truncated and the samples after that point are lost", index=self._index(number, position))
        except (tarfile.TarError, OSError, EOFError) as e:
            what = f"sample {key!r} (#{position})" if key is not None else "shard"
            yield BadSample(f"{path} {what}: cannot be read, rest of shard skipped ({type(e).__name__}: {e})",
                            index=self._index(number, position))

    def _raw(self, path: str, number: int, position: int, key: str, parts: dict[str, bytes]) -> tuple:
        if position >= self.index_stride:
            raise ValueError(f"{path} holds more than index_stride={self.index_stride} samples; raise index_stride")
        return f"{path} sample {key!r} (#{position})", self._index(number, position), key, parts

    def _index(self, number: int, position: int) -> int:
        """The ``index`` of the sample at ``position`` in shard ``number`` (also that of a bad one)."""
        return number * self.index_stride + position

    def _decode(self, where: str, index: int, key: str, parts: dict[str, bytes]) -> dict[str, Any] | BadSample:
        bad = functools.partial(BadSample, index=index)
        unread = {ext: v.size for ext, v in parts.items() if isinstance(v, _Unread)}
        if unread:
            sizes = ", ".join(f"{key}.{ext} is {size:,} bytes" for ext, size in unread.items())
            return bad(f"{where}: {sizes}, above the limit of {MAX_MEMBER_BYTES:,}; not read")
        ext = next((e for e in self.image_exts if e in parts), None)
        if ext is None:
            return bad(f"{where}: no image member (has {', '.join(sorted(parts))})")
        if self.caption_ext not in parts:
            return bad(f"{where}: no .{self.caption_ext} caption member")
        try:
            caption = clean_caption(parts[self.caption_ext].decode("utf-8"))
        except UnicodeDecodeError:
            return bad(f"{where}: caption is not valid UTF-8")
        if caption is None:
            return bad(f"{where}: empty caption")
        if too_long := caption_too_long(caption):
            return bad(f"{where}: {too_long}")
        image = decode_image(parts[ext], f"{key}.{ext}")
        if isinstance(image, str):
            return bad(f"{where}: {image}")
        return make_sample(image, caption, index, index, _label(parts))


def _class_names(names: list[str] | str | None) -> list[str] | None:
    if not isinstance(names, str):
        return list(names) if names is not None else None
    if not os.path.isfile(names):
        raise FileNotFoundError(f"WebDatasetShards: class_names={names!r} is neither a list nor a file")
    with open(names, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@dataclass(frozen=True)
class _Unread:
    """A member too large to read; its sample is skipped."""

    size: int


def _expand(pattern: str, storage_options: dict[str, Any] | None) -> list[str]:
    """The shard locations of one source: ``::``-separated parts, brace-expanded (as webdataset
    does); local globs expanded too. Commands and URLs cannot be listed, so they are taken as given."""
    paths: list[str] = []
    for part in pattern.split("::"):
        for p in braceexpand(part):
            if is_remote(p):
                paths.append(p)
            else:
                p = local_path(p)
                paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
    remote = [p for p in paths if is_remote(p)]
    first_of_protocol: dict[str, str] = {}
    for p in remote:
        first_of_protocol.setdefault(p.split(":", 1)[0], p)
    for p in first_of_protocol.values():
        check_reader(p)
    if not any(os.path.exists(p) for p in paths if not is_remote(p)):
        if not remote:
            raise FileNotFoundError(f"WebDatasetShards: no shard found for {pattern!r}")
        _check_opens(pattern, remote[0], storage_options)
    return paths  # a missing shard among existing ones is reported per epoch as a bad sample


def _check_opens(pattern: str, location: str, storage_options: dict[str, Any] | None) -> None:
    """Open the first remote shard and read its first block, so that a wrong bucket, URL or
    command fails here, once, instead of as every shard of every epoch skipped."""
    try:
        with open_shard(location, storage_options) as stream:
            if len(stream.read(tarfile.BLOCKSIZE)) == tarfile.BLOCKSIZE:
                raise StopReading  # it opens: leave early (a command is stopped, not waited for)
    except StopReading:
        return
    except OSError as e:
        raise FileNotFoundError(f"WebDatasetShards: no shard found for {pattern!r}: the first one, {location}, "
                                f"cannot be read ({type(e).__name__}: {e})") from e


def _label(parts: dict[str, bytes]) -> int:
    try:
        if "cls" in parts:
            return int(parts["cls"].decode().strip())
        if "json" in parts:
            label = json.loads(parts["json"]).get("label", -1)
            return int(label) if label is not None else -1
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        pass
    return -1


def _mix(streams: list[Iterator], weights: list[float], rng: np.random.Generator) -> Iterator:
    """Interleave source streams, picking the next source by weight until all are exhausted."""
    active = [(s, w) for s, w in zip(streams, weights) if w > 0]
    while active:
        if len(active) == 1:
            yield from active[0][0]
            return
        p = np.array([w for _, w in active])
        k = rng.choice(len(active), p=p / p.sum())
        try:
            yield next(active[k][0])
        except StopIteration:
            active.pop(k)


def _shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.integers(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
