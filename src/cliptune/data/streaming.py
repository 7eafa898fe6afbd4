"""Training pairs streamed straight from WebDataset shards, never extracted to disk.

What a rank sees is a pure function of (seed, epoch, rank), as in `batches`: the rank's shards in
an order drawn from the seed, their (image, caption) pairs through a seeded shuffle buffer, cut into
micro-batches. DataLoader workers split the *decoding*, not the reading: each worker reads the rank's
whole stream and decodes only the micro-batches the DataLoader will ask it for (round-robin). So the
batches do not depend on the number of workers, and a resumed run skips the steps it has done
without decoding a single image of them. The price: every worker reads every sample, so with W
workers a rank streams at most 1 / (read + decode / W) samples a second. Reading a sample from a
tar is cheap next to decoding and resizing it, so that stays close to W decoders for a few workers
(measured in docs/speed.md, "WebDataset shards").

An epoch is a fixed number of steps (planned from a count of the shards' samples); a rank whose
shards run out first starts another pass over them, so every rank makes every step (DDP needs that).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS
from cliptune.data.batches import pad_token_batch, pad_token_id, tokenize_texts
from cliptune.data.images import ImageError, ImageTransform
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import DataError
from cliptune.data.shards import (
    SHARD_IMAGE_KEYS,
    ShardStats,
    decode_image_bytes,
    iter_raw_samples,
    sample_captions,
)
from cliptune.extras import require


def expand_shards(pattern: str) -> list[str]:
    """`shards/train-{000000..000099}.tar` -> the 100 shard names (also `a.tar::b.tar` lists)."""
    return list(require("webdataset.shardlists", "shards").expand_urls(pattern))


@dataclass(frozen=True)
class ShardCount:
    samples: int  # samples with an image member and a caption member
    captions: int  # their captions, all of them
    skipped: list[tuple[str, str]]  # (shard:key, why) of samples the stream will skip


def count_shards(shards: list[str]) -> ShardCount:
    """Count samples and captions from the tar headers and the small caption members only (image
    bytes are skipped over, not read). Needed to plan an epoch's steps before streaming it."""
    samples = captions = 0
    skipped: list[tuple[str, str]] = []
    for shard in shards:
        try:
            archive = tarfile.open(shard, mode="r:*")
        except (OSError, tarfile.TarError) as err:
            raise DataError(f"{shard}: not a readable tar shard ({err})") from None
        with archive:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for info in archive:
                if not info.isfile() or "." not in info.name.rsplit("/", 1)[-1]:
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, _, extension = base.partition(".")  # WebDataset's rule: the key ends at the first dot
                members.setdefault(f"{folder}/{stem}", {})[extension.lower()] = info
            for key, parts in members.items():
                name = f"{shard}:{key.lstrip('/')}"
                if not any(ext in parts for ext in SHARD_IMAGE_KEYS):
                    skipped.append((name, f"no image member (.{', .'.join(SHARD_IMAGE_KEYS)})"))
                    continue
                n = _caption_count(archive, parts, name)
                if n:
                    samples, captions = samples + 1, captions + n
                else:
                    skipped.append((name, "no readable, non-empty caption (.txt or .json)"))
    return ShardCount(samples, captions, skipped)


def _caption_count(archive: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], name: str) -> int:
    """How many captions the stream will find in this sample (0: it skips the sample)."""
    sample = {ext: archive.extractfile(parts[ext]).read() for ext in ("txt", "json") if ext in parts}
    try:
        return len(sample_captions(sample, name))
    except (ValueError, UnicodeDecodeError):  # the stream skips (and reports) the same sample
        return 0


def sample_image_id(shard: str, key: str) -> int:
    """A stable 62-bit id per sample, the same on every rank: the loss's same-image mask needs it."""
    return int.from_bytes(hashlib.blake2b(f"{shard}\0{key}".encode(), digest_size=8).digest(), "little") >> 2


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream with `size` items held at a time (WebDataset's scheme)."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class _Pair:
    shard: str
    key: str
    data: bytes  # shared by the pairs of one sample
    caption: str


class ShardPairStream(IterableDataset):
    """This rank's micro-batches for steps [start_step, steps) of one epoch, as `PairCollator` makes
    them: uint8 pixels, padded token ids, image ids, and `errors` for images that would not decode."""

    def __init__(self, shards: list[str], preprocessing: Preprocessing, transform: ImageTransform, *, seed: int,
                 epoch: int, start_step: int, steps: int, micro_batch: int, accum: int, rank: int, world_size: int,
                 captions: str = "sample", buffer: int = 1000, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if not shards:
            raise DataError("no WebDataset shards to stream")
        self.shards, self.preprocessing, self.transform = shards, preprocessing, transform
        self.seed, self.epoch, self.start_step, self.steps = seed, epoch, start_step, steps
        self.micro_batch, self.accum, self.rank, self.world_size = micro_batch, accum, rank, world_size
        self.captions, self.buffer, self.max_pixels = captions, buffer, max_pixels
        self.stats = ShardStats()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum

    def _pass(self, pass_number: int) -> Iterator[tuple[str, str, bytes, list[str]]]:
        """One pass over this rank's samples. With at least as many shards as ranks each rank reads
        its own shards; with fewer, every rank reads them all and keeps every world_size-th sample."""
        own_shards = len(self.shards) >= self.world_size
        order = self.shards[self.rank::self.world_size] if own_shards else list(self.shards)
        random.Random(f"{self.seed}:shards:{self.epoch}:{self.rank}:{pass_number}").shuffle(order)
        for index, (shard, key, data, captions, _) in enumerate(iter_raw_samples(order, self.stats)):
            if own_shards or index % self.world_size == self.rank:
                yield shard, key, data, captions

    def _pairs(self) -> Iterator[_Pair]:
        """Pairs pass after pass, each pass shuffled on its own so one epoch's worth of steps sees every
        sample once (when the epoch is exactly one pass) before any sample comes again."""
        for pass_number in itertools.count():
            rng = random.Random(f"{self.seed}:pairs:{self.epoch}:{self.rank}:{pass_number}")

            def expanded(rng=rng, pass_number=pass_number):
                for shard, key, data, captions in self._pass(pass_number):
                    if self.captions == "sample":
                        yield _Pair(shard, key, data, captions[rng.randrange(len(captions))])
                    else:
                        for caption in captions:
                            yield _Pair(shard, key, data, caption)

            produced = 0
            for pair in shuffle_buffer(expanded(), self.buffer, random.Random(f"{self.seed}:buffer:{self.epoch}:"
                                                                                f"{self.rank}:{pass_number}")):
                produced += 1
                yield pair
            if not produced:
                raise DataError(f"rank {self.rank}: no usable sample in its shards "
                                f"(skipped: {self.stats.skipped[:3]})")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, end = self.start_step * self.accum, self.steps * self.accum
        pairs = self._pairs()
        for number in range(end):
            micro = list(itertools.islice(pairs, self.micro_batch))
            # The DataLoader asks workers in turn, starting with worker 0 at the first batch it yields.
            if number >= first and (number - first) % workers == worker:
                yield self.collate(micro, number)

    def collate(self, pairs: list[_Pair], number: int) -> dict:
        pixels, texts, ids, errors = [], [], [], []
        for position, pair in enumerate(pairs):
            name = f"{pair.shard}:{pair.key}"
            rng = random.Random(f"{self.seed}:augment:{self.epoch}:{self.rank}:{number}:{position}") \
                if self.transform.augment else None
            try:
                # A reduced JPEG decode only for augmented images: un-augmented ones are the processor's pixels.
                draft = self.transform.size * 2 if rng is not None else None
                image = decode_image_bytes(pair.data, name, self.max_pixels, draft_size=draft)
            except ImageError as err:
                errors.append((name, str(err)))
                continue
            pixels.append(self.transform(image, rng))
            texts.append(pair.caption)
            ids.append(sample_image_id(pair.shard, pair.key))
        batch: dict = {"errors": errors}
        if pixels:
            tokens, _ = tokenize_texts(texts, self.preprocessing)
            length = self.preprocessing.max_text_length if self.preprocessing.pad_to_max_length else None
            batch.update(pad_token_batch(tokens, pad_token_id(self.preprocessing), length))
            batch["pixels"] = torch.stack(pixels)
            batch["image_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


__all__ = ["expand_shards", "ShardCount", "count_shards", "sample_image_id", "shuffle_buffer", "ShardPairStream"]
