"""From records to batches: checked images, captions tokenised once, a deterministic epoch plan.

Everything random about the data (the order, which caption each image gets, augmentation) is a
function of (seed, epoch, position), never of worker or global RNG state. That is what makes a
resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from cliptune.data.images import ImageError, ImageTransform, open_rgb
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions


@dataclass
class TokenizedCaptions:
    """Token ids of every caption of a split, unpadded. ids[i][j] = caption j of image i."""

    ids: list[list[list[int]]]
    truncated: int
    pad_token_id: int
    max_length: int
    pad_to_max_length: bool


def tokenize_texts(texts: list[str], preprocessing: Preprocessing) -> tuple[list[list[int]], int]:
    """Unpadded token ids of each text; over-long ones are cut (keeping the end token). Returns the
    ids and how many were cut."""
    encoded = preprocessing.tokenizer(texts, truncation=False, padding=False, verbose=False)["input_ids"] if texts else []
    limit, truncated, ids = preprocessing.max_text_length, 0, []
    for tokens in encoded:
        if len(tokens) > limit:
            truncated += 1
            tokens = tokens[: limit - 1] + tokens[-1:]  # the last token is the end-of-text marker
        ids.append(tokens)
    return ids, truncated


def pad_token_id(preprocessing: Preprocessing) -> int:
    pad = preprocessing.tokenizer.pad_token_id
    return pad if pad is not None else 0


def tokenize_captions(records: list[ImageCaptions], preprocessing: Preprocessing) -> TokenizedCaptions:
    """Tokenise every caption once, up front; over-long ones are cut (keeping the end token) and counted."""
    flat, truncated = tokenize_texts([caption for record in records for caption in record.captions], preprocessing)
    ids, position = [], 0
    for record in records:
        ids.append(flat[position: position + len(record.captions)])
        position += len(record.captions)
    return TokenizedCaptions(ids, truncated, pad_token_id(preprocessing), preprocessing.max_text_length,
                             preprocessing.pad_to_max_length)


def pad_token_batch(sequences: list[list[int]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (or `length`): (B, L) input_ids and attention_mask."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    width = length or int(lengths.max())
    if lengths.max() > width:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit the padded length {width}")
    # One pass over all tokens: a torch.tensor per caption cost as much as copying the batch's pixels.
    mask = np.arange(width) < lengths[:, None]  # (B, L): row-major True cells are each row's first tokens
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def scan_images(records: list[ImageCaptions], max_pixels: int, workers: int = 4,
                desc: str = "checking images") -> tuple[list[ImageCaptions], list[tuple[str, str]]]:
    """Open every image once before training (JPEG at 1/8 scale, so it is quick) and return the
    good records and, for the bad ones, (path, reason). Nothing fails an hour in."""

    def check(record: ImageCaptions) -> str | None:
        try:
            open_rgb(record.image_path, max_pixels, draft_size=32)
            return None
        except ImageError as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(tqdm(pool.map(check, records), total=len(records), desc=desc, leave=False, mininterval=1.0))
    good = [r for r, why in zip(records, reasons) if why is None]
    bad = [(str(r.image_path), why) for r, why in zip(records, reasons) if why is not None]
    return good, bad


SKIPPED_SHOWN = 5  # files listed on the console; the report and metrics.json list them all


def skip_reason(path: str, reason: str) -> str:
    """`reason` without the leading "path: " that ImageError messages carry (the path is shown beside it)."""
    return reason.removeprefix(f"{path}: ")


def skipped_lines(bad: list[tuple[str, str]], limit: int = SKIPPED_SHOWN) -> list[str]:
    """The first `limit` skipped files, one "  path: reason" line each."""
    return [f"  {path}: {skip_reason(path, why)}" for path, why in bad[:limit]]


def describe_skipped(bad: list[tuple[str, str]], checked: int, what: str) -> str:
    """What the console shows after an image check: one summary line and the first few files."""
    first = f"; the first {SKIPPED_SHOWN}" if len(bad) > SKIPPED_SHOWN else ""
    return "\n".join([f"skipped {len(bad)} of {checked} {what}: unreadable{first}", *skipped_lines(bad)])


def epoch_pairs(records: list[ImageCaptions], mode: str, seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's (image index, caption index) pairs, shuffled. `sample`: one random caption per
    image; `all`: every caption."""
    rng = random.Random(f"{seed}:pairs:{epoch}")
    if mode == "sample":
        pairs = [(i, rng.randrange(len(r.captions))) for i, r in enumerate(records)]
    else:
        pairs = [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]
    rng.shuffle(pairs)
    return pairs


def plan_steps(n_pairs: int, effective_batch: int, world_size: int) -> int:
    """Optimizer steps in one epoch: partial last batches are kept, trimmed to a multiple of the world size."""
    full, rest = divmod(n_pairs, effective_batch)
    return full + (1 if rest >= world_size else 0)


def step_micro_batches(pairs: list[tuple[int, int]], step: int, micro_batch: int, accum: int,
                       rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches for optimizer step `step` of the epoch.

    The global batch of the step is split rank-major: rank r takes the r-th contiguous share, then
    cuts it into `accum` micro-batches. Gathering features rank by rank restores the global order.
    """
    per_step = micro_batch * accum * world_size
    chunk = pairs[step * per_step: (step + 1) * per_step]
    share = len(chunk) // world_size
    mine = chunk[rank * share: (rank + 1) * share]
    size = -(-len(mine) // accum)  # ceil: a short last step keeps `accum` micro-batches where it can
    return [mine[i: i + size] for i in range(0, len(mine), size)]


def decode_pixels(path, transform: ImageTransform, max_pixels: int, image_source=None,
                  rng: random.Random | None = None) -> torch.Tensor:
    """(3, size, size) uint8 pixels of one image, from the cache when there is one.

    Without augmentation these are exactly the model's image processor's pixels: a cache built with
    the transform's size and resize rule holds them already (no PIL round trip, no resize), and
    files are decoded in full. A cache of another size or rule is resized again (close,
    not identical; the trainer warns), and only augmented images may come from a reduced JPEG decode.
    """
    augmenting = transform.augment is not None and rng is not None
    if image_source is not None:
        if not augmenting and image_source.exact_for(transform):
            # A (3, S, S) view of the (S, S, 3) row, not a channels-first copy: de-interleaving the
            # channels costs several times the copy itself, and `PairCollator` stacks such rows as they
            # are (the batch is then channels-last in memory; the device reorders it for free).
            return torch.from_numpy(image_source.get_array(path)).permute(2, 0, 1)
        image = image_source.get_pil(path)
    else:
        image = open_rgb(path, max_pixels, draft_size=transform.size * 2 if augmenting else None)
    return transform(image, rng)


def scan_cached(records: list[ImageCaptions], cache) -> tuple[list[ImageCaptions], list[tuple[str, str]]]:
    """`scan_images` for a built cache: its build already decoded every image and noted the bad ones."""
    good, bad = [], []
    for record in records:
        try:
            cache.get_array(record.image_path)
            good.append(record)
        except ImageError as err:
            bad.append((str(record.image_path), str(err)))
    return good, bad


class PairDataset(Dataset):
    """Maps (epoch, image index, caption index) to (uint8 image tensor, token ids, image index)."""

    def __init__(self, records: list[ImageCaptions], captions: TokenizedCaptions, transform: ImageTransform,
                 seed: int, max_pixels: int, image_source=None):
        self.records = records
        self.captions = captions
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.image_source = image_source  # an ImageCache, or None to decode the files

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, image_index, caption_index = key
        record = self.records[image_index]
        rng = random.Random(f"{self.seed}:augment:{epoch}:{image_index}") if self.transform.augment else None
        try:
            pixels = decode_pixels(record.image_path, self.transform, self.max_pixels, self.image_source, rng)
        except ImageError as err:
            return {"error": str(err), "path": str(record.image_path)}
        return {
            "pixels": pixels,
            "tokens": self.captions.ids[image_index][caption_index],
            "image_index": image_index,
        }


def stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) uint8 images -> (B, 3, H, W). Images that are channels-last in memory (cache rows, see
    `decode_pixels`) are stacked as (B, H, W, 3), a plain copy each, and viewed as (B, 3, H, W).
    `default_collate` stacks straight into shared memory in a DataLoader worker (one copy fewer than
    pickling a batch made elsewhere)."""
    rows = [p.permute(1, 2, 0) for p in pixels]
    if all(row.is_contiguous() for row in rows):
        return default_collate(rows).permute(0, 3, 1, 2)
    return default_collate(pixels)


class PairCollator:
    """Stacks pixels, pads captions to the batch's longest (SigLIP: to its fixed length), drops unreadable items."""

    def __init__(self, captions: TokenizedCaptions):
        self.captions = captions

    def __call__(self, items: list[dict]) -> dict:
        good = [item for item in items if "error" not in item]
        batch = {"errors": [(item["path"], item["error"]) for item in items if "error" in item]}
        if not good:
            return batch
        length = self.captions.max_length if self.captions.pad_to_max_length else None
        batch.update(pad_token_batch([item["tokens"] for item in good], self.captions.pad_token_id, length))
        batch["pixels"] = stack_pixels([item["pixels"] for item in good])  # (B, 3, H, W) uint8
        batch["image_ids"] = torch.tensor([item["image_index"] for item in good], dtype=torch.long)
        return batch


class StepBatchSampler:
    """Yields, for each optimizer step from `start_step`, this rank's micro-batches as lists of
    dataset keys. Resuming mid-epoch starts at the right step without touching earlier images."""

    def __init__(self, pairs: list[tuple[int, int]], epoch: int, steps: int, start_step: int,
                 micro_batch: int, accum: int, rank: int, world_size: int):
        self.pairs, self.epoch, self.steps, self.start_step = pairs, epoch, steps, start_step
        self.micro_batch, self.accum, self.rank, self.world_size = micro_batch, accum, rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start_step, self.steps):
            for micro in step_micro_batches(self.pairs, step, self.micro_batch, self.accum, self.rank, self.world_size):
                yield [(self.epoch, image, caption) for image, caption in micro]

    def __len__(self) -> int:
        return sum(len(step_micro_batches(self.pairs, s, self.micro_batch, self.accum, self.rank, self.world_size))
                   for s in range(self.start_step, self.steps))
