"""Training and validation data for the trainer, built from a :class:`TrainConfig`.

Map-style data (the synthetic scenes, CSV/TSV/parquet tables) is read in a seeded permutation per
epoch, so a data position ``(epoch, batches)`` pins down exactly what comes next: a resumed run sees
the same batches as an uninterrupted one. Webdataset shards are a stream whose every reader (one
DataLoader worker of one process) is a pure function of ``(seed, epoch, rank, worker)``; the position
``(epoch, items handed out by each reader, the reader of the last batch)`` pins down what comes next, and
a resume fast-forwards each reader there reading tar headers only (:mod:`ldmclip.data.shards`).

``--batch-size`` is the *global* batch. With ``W`` processes, map-style data cuts each global batch
of the permutation into ``W`` consecutive slices and process ``r`` loads slice ``r`` only: the set
of samples at a step does not depend on ``W``, so runs on 1 and on 8 GPUs see the same batches
(and, with the loss over the global batch, take the same steps). Shards are split across
processes and DataLoader workers by :mod:`ldmclip.data.shards`; each process reads
``batch_size / W`` samples per step from its own shards.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.errors import UserError
from ..core.formats import is_table
from ..transforms import EvalTransform, PreprocessConfig, image_transform
from .config import DEFAULT_SYNTHETIC_STEPS, TrainConfig

SYNTHETIC = "synthetic"


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0  # batches already taken from this epoch
    # webdataset shards, this process: items (samples and bad ones) each reader handed out in this epoch
    # in the batches taken, and the reader of the last batch (-1: none yet)
    readers: dict[int, int] = field(default_factory=dict)
    last_reader: int = -1


@dataclass
class TrainBatch:
    images: torch.Tensor
    tokens: torch.Tensor
    skipped: Counter = field(default_factory=Counter)
    position_after: DataPosition = field(default_factory=DataPosition)
    keys: list[str] = field(default_factory=list)


class EpochPermutation(Sampler[int]):
    """Indices ``0..length-1`` in an order fixed by ``(seed, epoch)``, starting at ``start``."""

    def __init__(self, length: int, seed: int, epoch: int, start: int = 0):
        self.length, self.seed, self.epoch, self.start = length, seed, epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.length - self.start


class GlobalBatchSlices(Sampler[list[int]]):
    """This process's slice of each global batch of an :class:`EpochPermutation` (full batches only).

    Global batch ``b`` is ``order[b·B:(b+1)·B]``; process ``rank`` of ``world_size`` takes its
    ``[rank·B/W, (rank+1)·B/W)`` part, so the processes together load every sample of the batch
    exactly once."""

    def __init__(self, order: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} (the global batch) must be divisible by the "
                            f"number of processes ({world_size})")
        self.order, self.batch_size, self.rank, self.world_size = order, batch_size, rank, world_size
        self.local = batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        for index in self.order:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[lo:hi]
                batch = []

    def __len__(self) -> int:
        return len(self.order) // self.batch_size


def _on_device(batch, device: torch.device, position: DataPosition) -> TrainBatch:
    return TrainBatch(batch.images.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True),
                      Counter(batch.skipped), position, list(batch.keys))


KEYS_LOG_ENV = "LDMCLIP_TRAINED_KEYS"


def record_trained_keys(keys: list[str], step: int, rank: int = 0) -> None:
    """Debugging aid (tests of exact resume): with ``$LDMCLIP_TRAINED_KEYS=PATH`` set, append one line
    ``step<TAB>key,key,...`` per optimizer step to ``PATH.rank<R>``: the samples it trained on."""
    path = os.environ.get(KEYS_LOG_ENV)
    if path:
        with open(f"{path}.rank{rank}", "a") as file:
            file.write(f"{step}\t{','.join(keys)}\n")


class MapStyleData:
    """Batches from a map-style dataset, epoch after epoch, resumable at any batch.

    ``batch_size`` is the global batch; this process gets its ``rank``-th slice of each (see the
    module docs), so ``position`` counts global batches and is the same on every process."""

    def __init__(self, dataset: Dataset, collate, batch_size: int, workers: int, seed: int,
                 default_steps: int | None = None, rank: int = 0, world_size: int = 1, description: str = ""):
        if len(dataset) < batch_size:
            raise UserError(f"the training data has {len(dataset)} samples, fewer than one batch "
                            f"(--batch-size {batch_size})")
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch: it must be divisible by the "
                            f"number of processes ({world_size})")
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(dataset) // batch_size
        self.default_steps = default_steps
        self.description = description or f"{len(dataset)} samples"

    def total_steps(self, cfg: TrainConfig) -> int:
        if cfg.steps:
            return cfg.steps
        if self.default_steps:  # the synthetic stream is sized for this many steps; --epochs does not apply
            return self.default_steps
        if cfg.epochs:
            return max(1, math.ceil(cfg.epochs * self.batches_per_epoch))
        raise UserError("say how long to train: --steps N or --epochs E")

    def batches(self, position: DataPosition, device: torch.device) -> Iterator[TrainBatch]:
        from ..data.samples import exit_with_parent

        epoch, done = position.epoch, position.batches
        while True:
            order = EpochPermutation(len(self.dataset), self.seed, epoch, done * self.batch_size)
            slices = GlobalBatchSlices(order, self.batch_size, self.rank, self.world_size)
            loader = DataLoader(self.dataset, batch_sampler=slices,
                                num_workers=self.workers, collate_fn=self.collate,
                                persistent_workers=False, pin_memory=device.type == "cuda",
                                # a private generator: worker seeding must not consume the global RNG,
                                # or a resumed run would drift from an uninterrupted one
                                generator=torch.Generator().manual_seed(self.seed + epoch + 7919 * self.rank),
                                prefetch_factor=4 if self.workers else None,
                                worker_init_fn=exit_with_parent)  # no worker outlives a killed run
            for batch in loader:
                done += 1
                yield _on_device(batch, device, DataPosition(epoch, done))
            epoch, done = epoch + 1, 0


class _CountingCollate:
    """``collate_fn`` that tags each batch with the reader it came from and how many items it holds
    (inside a DataLoader worker, where the batch is made)."""

    def __init__(self, collate, reader_offset: int, workers: int):
        self.collate, self.reader_offset, self.workers = collate, reader_offset, max(1, workers)

    def __call__(self, samples):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.reader_offset) % self.workers, len(samples), self.collate(samples)


class StreamData:
    """Batches from webdataset shards (an endless stream when resampled), resumable exactly.

    ``batch_size`` is the global batch; each process reads ``batch_size / world_size`` samples a
    step from its own shards (split by rank and worker in :mod:`ldmclip.data.shards`). Each epoch is
    one pass of a ``ShardDataset`` seeded with ``(seed, epoch)``; the position after each batch counts
    the items of every reader, so :meth:`resumed_position` + :meth:`batches` continue where it was."""

    def __init__(self, make_dataset, collate, batch_size: int, workers: int, seed: int,
                 rank: int = 0, world_size: int = 1, description: str = "webdataset shards",
                 resampled: bool = True):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch: it must be divisible by the "
                            f"number of processes ({world_size})")
        self.make_dataset, self.collate = make_dataset, collate
        self.batch_size, self.workers, self.seed = batch_size // world_size, workers, seed
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.description = description

    def total_steps(self, cfg: TrainConfig) -> int:
        if not cfg.steps:
            raise UserError("webdataset shards are a stream: say how long to train with --steps N")
        return cfg.steps

    def stream_state(self, position: DataPosition) -> dict[str, Any]:
        """What a checkpoint keeps of this process's stream (one entry per rank)."""
        return {"epoch": position.epoch, "readers": dict(position.readers), "last_reader": position.last_reader,
                "workers": self.workers, "world_size": self.world_size, "seed": self.seed,
                "resampled": self.resampled, "batch_size": self.batch_size}

    def resumed_position(self, position: DataPosition, saved: list[dict[str, Any]] | None,
                         main: bool = True) -> DataPosition:
        """This process's position from a checkpoint's per-rank stream states. When the run cannot
        continue exactly (other processes, workers, seed, mode or batch; a checkpoint of an older
        ldmclip), one line says so and the stream goes on at the start of the next epoch: no sample of
        the interrupted epoch is given twice (its rest is left out)."""
        here = self.stream_state(DataPosition())
        problem = None
        if not saved:
            problem = "the checkpoint holds no webdataset stream position (an older ldmclip)"
        else:
            mine = saved[self.rank] if len(saved) == self.world_size else saved[0]
            changed = [name.replace("_", " ") for name in ("world_size", "workers", "seed", "resampled", "batch_size")
                       if mine.get(name) != here[name]]
            if changed:
                was = ", ".join(f"{name} {mine.get(name.replace(' ', '_'))} -> {here[name.replace(' ', '_')]}"
                                for name in changed)
                problem = f"the stream was split differently ({was}), so the readers' positions do not carry over"
            else:
                return DataPosition(position.epoch, position.batches,
                                    {int(k): int(v) for k, v in mine["readers"].items()}, int(mine["last_reader"]))
        if main:
            print(f"--resume: {problem}; the shards' epoch {position.epoch} is not continued, the stream "
                  f"restarts at epoch {position.epoch + 1} with the new split (the rest of epoch "
                  f"{position.epoch} is left out, nothing is repeated)", file=sys.stderr, flush=True)
        return DataPosition(position.epoch + 1, 0)

    def batches(self, position: DataPosition, device: torch.device) -> Iterator[TrainBatch]:
        """Endless batches. Shards that give no usable sample end the stream in a ``ShardStallError``
        naming them (raised by the shard reader, in a worker or here), never in an endless wait."""
        from ..data.samples import exit_with_parent

        epoch, done = position.epoch, position.batches
        readers, last = dict(position.readers), position.last_reader
        while True:
            dataset = self.make_dataset(epoch=epoch)
            # a fresh DataLoader starts its round robin at worker 0: that worker plays the reader after
            # the last one (a reader with nothing left is passed over, as the uninterrupted loader does)
            offset = (last + 1) % max(1, self.workers)
            dataset.resume_at(readers, offset)
            loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                                collate_fn=_CountingCollate(self.collate, offset, self.workers),
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.seed + epoch + 7919 * self.rank),
                                worker_init_fn=exit_with_parent)  # no worker outlives a killed run
            produced = 0
            for reader, items, batch in loader:
                done += 1
                produced += 1
                readers[reader] = readers.get(reader, 0) + items
                last = reader
                yield _on_device(batch, device, DataPosition(epoch, done, dict(readers), last))
            if produced == 0 and done == 0:
                raise UserError("the webdataset shards yielded no batch; check the --data pattern and the shards")
            epoch, done, readers, last = epoch + 1, 0, {}, -1


def build_train_data(cfg: TrainConfig, tokenizer, preprocess: PreprocessConfig, rank: int = 0,
                     world_size: int = 1) -> MapStyleData | StreamData:
    from ..data import ImageTextCollator

    if cfg.data == SYNTHETIC:  # scenes are drawn at the model's size; a random crop would falsify captions
        transform = EvalTransform(preprocess.image_size, preprocess.mean, preprocess.std)
    else:
        transform = image_transform(preprocess, is_train=True, seed=cfg.seed)
    # samples stay RGB PIL images; the collator normalises each batch straight into one tensor
    transform.defer_normalize = True
    collate = ImageTextCollator(tokenizer, normalizer=transform.normalizer)
    if cfg.data == SYNTHETIC:
        from ..data.synthetic import SyntheticScenes

        steps = cfg.steps or DEFAULT_SYNTHETIC_STEPS
        # one epoch covers the whole run, so no scene is repeated
        dataset = SyntheticScenes("train", image_size=preprocess.image_size, length=steps * cfg.batch_size,
                                  seed=cfg.seed, transform=transform)
        return MapStyleData(dataset, collate, cfg.batch_size, cfg.workers, cfg.seed, default_steps=steps,
                            rank=rank, world_size=world_size,
                            description=f"synthetic scenes ({len(dataset):,} samples, generated)")
    if is_table(cfg.data):
        from ..data import CaptionTable

        if not cfg.images:
            raise UserError(f"--data {cfg.data} is a table of image paths: also pass --images ROOT")
        dataset = CaptionTable(cfg.data, cfg.images, transform, image_column=cfg.image_column,
                               caption_column=cfg.caption_column, split_file=cfg.split)
        return MapStyleData(dataset, collate, cfg.batch_size, cfg.workers, cfg.seed, rank=rank, world_size=world_size,
                            description=f"table {cfg.data} ({len(dataset):,} image-caption rows, images in {cfg.images})")
    from ..data import make_shard_pipeline

    def make_dataset(epoch: int):
        return make_shard_pipeline(cfg.data, transform, shuffle_buffer=cfg.shuffle_buffer,
                                   resampled=cfg.resampled, seed=cfg.seed, epoch=epoch)

    return StreamData(make_dataset, collate, cfg.batch_size, cfg.workers, cfg.seed, rank=rank, world_size=world_size,
                      description=_shards_description(cfg.data), resampled=cfg.resampled)


def _shards_description(pattern: str) -> str:
    from ..data.shards import dataset_size, expand_urls

    size = dataset_size(pattern)
    samples = f", {size:,} samples" if size else ""
    return f"webdataset shards {pattern} ({len(expand_urls(pattern))} shards{samples}, streamed)"


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass
class ZeroShotTask:
    """Images with class labels, classified among all ``classnames``; accuracy per image subset."""

    classnames: list[str]
    templates: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    subsets: dict[str, torch.Tensor]  # suffix -> boolean mask over the images


@dataclass
class Validation:
    """Retrieval recall on held-out pairs, plus zero-shot accuracy on synthetic classes if present.

    The inputs are loaded once (they are small) and kept as tensors; the scoring is ``ldmclip.eval``'s
    (``retrieval_metrics``, ``build_zero_shot_classifier``, ``zero_shot_predictions`` and
    ``classification_metrics``), so validation numbers are ``ldmclip eval``'s numbers."""

    images: torch.Tensor                     # [I, 3, S, S]
    tokens: torch.Tensor                     # [T, ctx]
    text_to_image: torch.Tensor              # [T]
    zero_shot: list[tuple[str, ZeroShotTask]] = field(default_factory=list)
    tokenizer: Any = None
    batch_size: int = 256
    description: str = ""

    def __post_init__(self) -> None:
        if not self.description:
            self.description = f"{len(self.images)} images, {len(self.tokens)} captions"

    @torch.no_grad()  # not inference_mode: FSDP2 keeps gathered parameters that training reuses
    def evaluate(self, model, device: torch.device) -> dict[str, float]:
        from ..eval import retrieval_metrics

        image_features = self._encode(model.encode_image, self.images, device)
        text_features = self._encode(model.encode_text, self.tokens, device)
        # the features are fp32; score them in fp32 even when the caller runs under autocast
        with torch.autocast(device.type, enabled=False):
            metrics = retrieval_metrics(image_features, text_features, self.text_to_image.to(device))
        keep = {k: v for k, v in metrics.items() if k.endswith(("R@1", "R@5", "R@10"))}
        for name, task in self.zero_shot:
            keep.update(self._zero_shot(model, name, task, device))
        return keep

    def _zero_shot(self, model, name: str, task: ZeroShotTask, device: torch.device) -> dict[str, float]:
        """Top-1 accuracy over each subset of the task's images, from one pass over all of them."""
        from ..eval import build_zero_shot_classifier, classification_metrics, zero_shot_predictions

        classifier = build_zero_shot_classifier(model, self.tokenizer, task.classnames, task.templates,
                                                device=device)
        batches = [(task.images[i:i + self.batch_size], task.labels[i:i + self.batch_size])
                   for i in range(0, len(task.images), self.batch_size)]
        top, labels = zero_shot_predictions(model, classifier, batches, device=device, k=1)
        num_classes = len(task.classnames)
        return {f"zeroshot_{name}{subset}_top1": classification_metrics(top[mask], labels[mask], num_classes, ks=(1,))["top1"]
                for subset, mask in task.subsets.items()}

    def _encode(self, encode, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = [encode(inputs[i:i + self.batch_size].to(device), normalize=True).float()
               for i in range(0, len(inputs), self.batch_size)]
        return torch.cat(out)


def build_validation(cfg: TrainConfig, tokenizer, preprocess: PreprocessConfig) -> Validation | None:
    eval_transform = EvalTransform(preprocess.image_size, preprocess.mean, preprocess.std)
    source = cfg.val_data or (SYNTHETIC if cfg.data == SYNTHETIC else None)
    if source is None:
        return None
    if source == SYNTHETIC:
        from ..data.synthetic import (HELD_OUT_PAIRS, SyntheticZeroShot, synthetic_retrieval_pairs,
                                      zero_shot_templates)

        pairs = synthetic_retrieval_pairs(cfg.val_size, image_size=preprocess.image_size, seed=cfg.seed + 1)
        images = torch.stack([eval_transform(image) for image, _ in pairs])
        tokens = tokenizer([caption for _, caption in pairs])
        # Every colour×shape class competes with all others; accuracy is reported over all images and
        # separately over the classes held out of training (composition never seen with its caption).
        data = SyntheticZeroShot(image_size=preprocess.image_size, per_class=20, seed=cfg.seed + 2,
                                 transform=eval_transform, classes="all")
        samples = [data[i] for i in range(len(data))]
        labels = torch.tensor([label for _, label in samples])
        held_out_pairs = set(HELD_OUT_PAIRS)
        held_out = torch.tensor([data.pairs[label] in held_out_pairs for label in labels.tolist()])
        task = ZeroShotTask(list(data.classnames), zero_shot_templates(), torch.stack([s[0] for s in samples]),
                            labels, {"": torch.ones_like(held_out), "_held_out": held_out, "_seen": ~held_out})
        zero_shot = [("colour_shape", task)]
        description = (f"held-out synthetic scenes ({len(pairs)} image-caption pairs; zero-shot over "
                       f"{len(task.classnames)} colour-shape classes, {len(labels)} images)")
        return Validation(images, tokens, torch.arange(len(pairs)), zero_shot, tokenizer, description=description)
    if is_table(source):
        return _table_validation(cfg, source, tokenizer, eval_transform)
    return _shard_validation(source, tokenizer, eval_transform, cfg.val_size)


def _table_validation(cfg: TrainConfig, source: str, tokenizer, transform) -> Validation:
    from ..data import CaptionTable

    if not cfg.images:
        raise UserError(f"--val-data {source} is a table of image paths: also pass --images ROOT")
    table = CaptionTable(source, cfg.images, transform, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, split_file=cfg.val_split)
    return table_retrieval_validation(table, tokenizer, cfg.val_size)


def _shard_validation(urls: str, tokenizer, transform, max_images: int) -> Validation:
    """Retrieval on the first ``max_images`` readable samples of webdataset shards, in shard order
    (no shuffling, so every evaluation sees the same pairs); one caption per image."""
    from ..data.samples import drain_pending
    from ..data.shards import ShardDataset

    data = ShardDataset(urls, transform, shuffle_buffer=0, split_by_node=False)
    images, captions = [], []
    for sample in data:
        if sample is None:
            continue
        images.append(sample.image)
        captions.append(sample.caption)
        if len(images) >= max_images:
            break
    drain_pending()  # validation's unreadable samples are not the training data's
    if len(images) < 2:
        raise UserError(f"--val-data {urls}: fewer than two readable image–caption pairs in these shards")
    return Validation(torch.stack(images), tokenizer(captions), torch.arange(len(images)), [], tokenizer,
                      description=f"webdataset shards {urls} (first {len(images)} image-caption pairs)")


def table_retrieval_validation(table, tokenizer, max_images: int | None = None) -> Validation:
    """Retrieval on a caption table: each readable image once, with all of its captions (up to
    ``max_images`` images; unreadable ones are skipped)."""
    images, captions, text_to_image = [], [], []
    for _, caption_indices in table.grouped():
        if max_images is not None and len(images) >= max_images:
            break
        sample = table[caption_indices[0]]
        if sample is None:
            continue
        images.append(sample[0])
        for index in caption_indices:
            captions.append(table.captions[index])
            text_to_image.append(len(images) - 1)
    if len(images) < 2:
        raise UserError(f"{table.path}: fewer than two readable validation images")
    return Validation(torch.stack(images), tokenizer(captions), torch.tensor(text_to_image), [], tokenizer,
                      description=f"table {table.path} ({len(images)} images, {len(captions)} captions)")
