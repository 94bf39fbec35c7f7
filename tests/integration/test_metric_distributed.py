# SPDX-License-Identifier: Apache-2.0
"""ImageRetrievalScore across two CPU processes (gloo) must equal one process on the same images.

The data sets have odd sizes, so a `DistributedSampler` pads them by repeating samples; with `indices=` those
repeats are removed after the gather. Without `indices` they are kept and reported with a warning (pinned here).
"""

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from diadm._imports import FAISS_AVAILABLE
from diadm.functional import image_retrieval_score
from diadm.metric import ImageRetrievalScore

WORLD_SIZE = 2
NUM_TRAIN, NUM_HELD_OUT, NUM_GENERATED, WIDTH = 101, 37, 53, 12


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(NUM_TRAIN, WIDTH, generator=generator)
    near = torch.randint(0, NUM_TRAIN // 2, (NUM_GENERATED,), generator=generator)
    generated = train[near] + 0.05 * torch.randn(NUM_GENERATED, WIDTH, generator=generator)
    held_out = train[torch.randint(0, NUM_TRAIN, (NUM_HELD_OUT,), generator=generator)]
    held_out = held_out + 0.05 * torch.randn(NUM_HELD_OUT, WIDTH, generator=generator)
    images = torch.randint(0, 256, (NUM_TRAIN, 1, 4, 4), generator=generator, dtype=torch.uint8)
    return {"train": train, "held_out": held_out, "generated": generated, "images": images}


def _loader(rows: torch.Tensor, rank: int) -> DataLoader:
    dataset = TensorDataset(rows, torch.arange(rows.shape[0]))
    sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=8, sampler=sampler)


def _feed(metric: ImageRetrievalScore, data: dict[str, torch.Tensor], rank: int, with_indices: bool) -> None:
    for kind, flags in (("train", (True, False)), ("held_out", (True, True)), ("generated", (False, False))):
        for rows, indices in _loader(data[kind], rank):
            metric.update_features(rows, *flags, indices=indices if with_indices else None)


def _as_floats(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # one thread in torch and in faiss (each links its own OpenMP), so no pool inherited through fork is used
    torch.set_num_threads(1)
    if FAISS_AVAILABLE:
        import faiss

        faiss.omp_set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        data = _data()
        results: dict[str, object] = {}

        # 1. uneven split with DistributedSampler padding, indices given: equals one process
        metric = ImageRetrievalScore(feature=None, reset_real_features=False)
        _feed(metric, data, rank, with_indices=True)
        results["indexed"] = _as_floats(metric.compute())
        results["indexed_nearest"] = metric.last_result.nearest_train_index
        # 2. the cached reference index survives reset() and a second evaluation under DDP
        index = metric._reference_index
        metric.reset()
        for rows, indices in _loader(data["generated"], rank):
            metric.update_features(rows, real=False, indices=indices)
        results["after_reset"] = _as_floats(metric.compute())
        results["index_reused"] = metric._reference_index is index

        # 3. no indices: the padded repeats stay in n_train, and a warning says so
        plain = ImageRetrievalScore(feature=None)
        _feed(plain, data, rank, with_indices=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["plain"] = _as_floats(plain.compute())
        results["plain_warnings"] = [str(w.message) for w in caught if "exact copies" in str(w.message)]

        # 4. float16 storage, and a rank that holds no generated and no held-out rows at all
        sparse = ImageRetrievalScore(feature=None, feature_dtype=torch.float16)
        for rows, indices in _loader(data["train"], rank):
            sparse.update_features(rows, real=True, indices=indices)
        if rank == 0:
            sparse.update_features(data["generated"][:20], real=False, indices=torch.arange(20))
        results["sparse"] = _as_floats(sparse.compute())

        # 5. images through the pixel extractor (the `update` path), uneven split, indices given
        pixels = ImageRetrievalScore(feature="pixels")
        for imgs, indices in _loader(data["images"], rank):
            pixels.update(imgs, real=True, indices=indices)
        pixels.update(data["images"][:30], real=False, indices=torch.arange(30))
        results["pixels"] = _as_floats(pixels.compute())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(data: dict[str, torch.Tensor]) -> dict[str, object]:
    expected: dict[str, object] = {}
    one = ImageRetrievalScore(feature=None)
    one.update_features(data["train"], real=True)
    one.update_features(data["held_out"], real=True, held_out=True)
    one.update_features(data["generated"], real=False)
    expected["indexed"] = _as_floats(one.compute())
    expected["indexed_nearest"] = one.last_result.nearest_train_index
    sparse = ImageRetrievalScore(feature=None, feature_dtype=torch.float16)
    sparse.update_features(data["train"], real=True)
    sparse.update_features(data["generated"][:20], real=False)
    expected["sparse"] = _as_floats(sparse.compute())
    pixels = ImageRetrievalScore(feature="pixels")
    pixels.update(data["images"], real=True)
    pixels.update(data["images"][:30], real=False)
    expected["pixels"] = _as_floats(pixels.compute())
    return expected


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    # fork, not spawn: a spawned child would import torch, torchmetrics and diadm again (tens of seconds on a busy
    # machine); the workers run single-threaded, so no OpenMP pool of the parent is used after the fork
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    data = _data()
    expected = _single_process(data)
    # the functional API on the same features is the reference of the single-process metric
    reference = image_retrieval_score(data["train"], data["generated"], data["held_out"])
    assert expected["indexed"]["n_learned"] == reference.synthetic.n_learned
    assert expected["indexed"]["irs_adjusted"] == pytest.approx(reference.irs_adjusted, abs=1e-6)

    for result in ranks:
        assert result["indexed"] == expected["indexed"]
        assert result["indexed"]["n_train"] == NUM_TRAIN  # 102 rows were gathered; the repeat was removed
        assert torch.equal(result["indexed_nearest"], expected["indexed_nearest"])
        assert result["after_reset"] == expected["indexed"]
        assert result["index_reused"] is True
        assert result["sparse"] == expected["sparse"]
        assert result["pixels"] == expected["pixels"]
        assert result["pixels"]["n_train"] == NUM_TRAIN

        # pinned limitation: without indices the padded repeat inflates n_train, and the warning names the fix
        assert result["plain"]["n_train"] == NUM_TRAIN + 1
        assert result["plain"]["n_samples"] == NUM_GENERATED + 1
        assert len(result["plain_warnings"]) == 3
        assert "1 of 102 real training feature rows are exact copies" in result["plain_warnings"][0]
        assert "Pass the dataset indices as `indices=`" in result["plain_warnings"][0]
