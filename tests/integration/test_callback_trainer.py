# SPDX-License-Identifier: Apache-2.0
"""IRSCallback in a real Trainer with a tiny diffusers UNet: TensorBoard and W&B read back, checkpoints, EMA."""

import json
import math
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diadm.callback import IRSCallback
from diadm.estimator import estimate_irs

NUM_TRAIN = 32
NUM_SAMPLES = 16


def training_images(num: int = NUM_TRAIN, seed: int = 0) -> torch.Tensor:
    """Smooth 8x8 one-channel images in [0, 1]."""
    coarse = torch.rand(num, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=8, mode="bilinear", align_corners=False)


class RecordingPipeline(DDPMPipeline):
    """A DDPMPipeline that keeps a copy of every batch it returns (the `outputs` list is set by its owner)."""

    outputs: list[np.ndarray]

    def __call__(self, *args, **kwargs):
        output = super().__call__(*args, **kwargs)
        self.outputs.append(np.array(output.images))
        return output


class TinyDiffusion(pl.LightningModule):
    """A two-level diffusers UNet2DModel trained with DDPM's epsilon loss, sampled through `pipeline()`."""

    def __init__(self, images: torch.Tensor, with_validation: bool = False) -> None:
        super().__init__()
        self.images = images
        self.with_validation = with_validation
        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=50)
        self.generated: list[np.ndarray] = []
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        clean = batch[0] * 2 - 1
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],))
        loss = F.mse_loss(self.unet(self.scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(training_images(8, seed=5)), batch_size=8)

    def pipeline(self) -> DDPMPipeline:
        pipe = RecordingPipeline(unet=self.unet, scheduler=DDPMScheduler.from_config(self.scheduler.config))
        pipe.outputs = self.generated
        return pipe


def fit(tmp_path: Path, module: pl.LightningModule, callbacks: list, logger, max_epochs: int = 2, **kwargs):
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module)
    return trainer


def expected_scores(module: TinyDiffusion, evaluation: int) -> tuple[float, float, int]:
    """irs_inf, irs_alpha and k recomputed from the images the pipeline returned, by brute-force retrieval."""
    batch = torch.from_numpy(module.generated[evaluation]).permute(0, 3, 1, 2)
    nearest = torch.cdist(batch.flatten(1).double(), module.images.flatten(1).double()).argmin(dim=1)
    estimate = estimate_irs(NUM_TRAIN, batch.shape[0], nearest.unique().numel())
    return estimate.irs_inf, estimate.irs_alpha, estimate.n_learned


def irs_callback(**kwargs) -> IRSCallback:
    kwargs.setdefault("num_samples", NUM_SAMPLES)
    kwargs.setdefault("sample_batch_size", NUM_SAMPLES)
    kwargs.setdefault("feature", "pixels")
    kwargs.setdefault("pipeline_kwargs", {"num_inference_steps": 2})
    kwargs.setdefault("num_images", 4)
    return IRSCallback(**kwargs)


def test_tensorboard_scalars_images_and_histogram_read_back(tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TinyDiffusion(training_images())
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    irs = irs_callback()
    fit(tmp_path, module, [irs], logger)
    assert len(module.generated) == 2  # one pipeline call per evaluation (epochs 0 and 1)
    assert "it/s" not in capfd.readouterr().err  # the pipeline's progress bar stays off during `fit`

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    expected_scalars = {"irs/irs_inf", "irs/irs_inf_lower", "irs/irs_inf_upper", "irs/irs_alpha", "irs/fid"}
    assert expected_scalars | {"irs/num_samples", "irs/n_learned"} <= set(tags["scalars"])
    assert set(tags["images"]) == {"irs/samples", "irs/samples_and_retrieved", "irs/never_retrieved"}
    assert tags["histograms"] == ["irs/retrieval_counts"]

    for evaluation, event in enumerate(events.Scalars("irs/irs_inf")):
        irs_inf, irs_alpha, n_learned = expected_scores(module, evaluation)
        # TensorBoard stores float32.
        assert event.value == pytest.approx(irs_inf, abs=1e-6)
        assert events.Scalars("irs/irs_alpha")[evaluation].value == pytest.approx(irs_alpha, abs=1e-6)
        assert events.Scalars("irs/n_learned")[evaluation].value == n_learned
        assert events.Scalars("irs/num_samples")[evaluation].value == NUM_SAMPLES
    assert len(events.Scalars("irs/irs_inf")) == 2
    fid = [event.value for event in events.Scalars("irs/fid")]
    assert fid == pytest.approx([entry["fid"] for entry in irs.history], rel=1e-6)  # float32 in the event file
    assert all(math.isfinite(value) and value > 0 for value in fid)

    # 4 batches per epoch: evaluations after global steps 4 and 8, filed under Lightning's steps 3 and 7 (where its
    # own epoch-end values of those epochs go), pictures and scalars alike.
    assert [entry["global_step"] for entry in irs.history] == [4, 8]
    for kind, tag in [("Scalars", "irs/irs_inf"), ("Images", "irs/samples"), ("Histograms", "irs/retrieval_counts")]:
        assert [event.step for event in getattr(events, kind)(tag)] == [3, 7], tag

    # 4 samples in a 2 x 2 grid of 8 x 8 images with a one-pixel border: (2 * 9 + 1) pixels each side.
    samples = events.Images("irs/samples")
    assert [(image.width, image.height) for image in samples] == [(19, 19), (19, 19)]
    pairs = events.Images("irs/samples_and_retrieved")[0]
    assert (pairs.width, pairs.height) == (4 * 9 + 1, 19)  # each sample beside its retrieved training image
    histogram = events.Histograms("irs/retrieval_counts")[-1].histogram_value
    assert (histogram.num, histogram.sum) == (NUM_TRAIN, NUM_SAMPLES)  # one count per training image, n in total


def offline_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run, read back from its `.wandb` file (what `wandb sync` would upload).

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each a 4-byte checksum, a
    2-byte little-endian length, a 1-byte type (1 full, 2 first, 3 middle, 4 last) and its bytes; the bytes of a full
    or reassembled record are one protobuf `Record`. A block's last 6 bytes or fewer are padding.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_file_holds_the_scores_and_pictures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    module = TinyDiffusion(training_images())
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="diadm-tests")
    irs = irs_callback()
    try:
        fit(tmp_path, module, [irs], logger, max_epochs=1)
        files = Path(logger.experiment.dir)
    finally:
        wandb.finish()  # flushes the run file
    rows = offline_history(files.parent)
    logged = {key: value for row in rows for key, value in row.items() if key.startswith("irs/")}
    # One epoch of 4 batches: everything is filed under Lightning's step 3, the step of its epoch-end values.
    assert {row["trainer/global_step"] for row in rows} == {3}
    irs_inf, irs_alpha, n_learned = expected_scores(module, 0)
    assert logged["irs/irs_inf"] == pytest.approx(irs_inf, abs=1e-12)
    assert logged["irs/irs_alpha"] == pytest.approx(irs_alpha, abs=1e-12)
    assert (logged["irs/n_learned"], logged["irs/num_samples"]) == (n_learned, NUM_SAMPLES)
    assert logged["irs/fid"] == pytest.approx(irs.history[0]["fid"], rel=1e-12)
    sizes = {"samples": (19, 19), "samples_and_retrieved": (37, 19), "never_retrieved": (19, 19)}
    for name, (width, height) in sizes.items():
        entry = [logged[f"irs/{name}/{field}"] for field in ("_type", "count", "width", "height")]
        assert entry == ["images/separated", 1, width, height], name
        assert (files / logged[f"irs/{name}/filenames"][0]).is_file()
    assert logged["irs/retrieval_counts/_type"] == "histogram"
    counts = logged["irs/retrieval_counts/values"]
    assert sum(counts) == NUM_TRAIN  # one count per training image
    assert counts[0] == NUM_TRAIN - n_learned  # the first bin holds the never-retrieved images


class Scalar(pl.LightningModule):
    """One weight pulled towards 1; samples are flat images of its value, so the sampler can see the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.weight - 1) ** 2

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4, 1, 2, 2)), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(2, 1, 2, 2)), batch_size=1)


class RawWeights(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(pl_module.weight.item())


def ema(values: list[float], decay: float) -> float:
    average = values[0]  # the first update copies the weights
    for value in values[1:]:
        average = decay * average + (1 - decay) * value
    return average


@pytest.mark.parametrize("evaluate_on", ["train_epoch_end", "validation_epoch_end"])
def test_model_checkpoint_monitors_the_logged_score(tmp_path, evaluate_on):
    real = torch.rand(24, 1, 2, 2)
    distinct = iter([8, 24, 4])  # how many training images the sampler reproduces at each evaluation

    def sample_fn(pl_module, num_images, generator):
        return real[torch.arange(num_images) % next(distinct)]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="irs/irs_inf", mode="max", save_top_k=1)
    irs = IRSCallback(
        num_samples=24,
        sample_fn=sample_fn,
        feature="pixels",
        real_data=real,
        evaluate_on=evaluate_on,
        log_images=False,
        compute_fid=False,
    )
    fit(tmp_path, Scalar(), [irs, checkpoint], False, max_epochs=3, enable_checkpointing=True, limit_val_batches=1)
    scores = [entry["irs_inf"] for entry in irs.history]
    assert [entry["n_learned"] for entry in irs.history] == [8, 24, 4]
    assert checkpoint.best_model_score.item() == pytest.approx(max(scores), abs=1e-6)
    assert Path(checkpoint.best_model_path).name.startswith("epoch=1-")  # the middle evaluation is the best


@pytest.mark.parametrize(
    ("evaluate_on", "irs_first", "scores"),
    [
        ("validation_epoch_end", True, "averaged"),
        ("validation_epoch_end", False, "raw"),
        ("train_epoch_end", True, "raw"),
    ],
    ids=["validation-before-ema", "validation-after-ema", "train-epoch-end"],
)
def test_weights_scored_next_to_ema(tmp_path, evaluate_on, irs_first, scores):
    seen: list[float] = []

    def sample_fn(pl_module, num_images, generator):
        seen.append(pl_module.weight.item())
        return torch.rand(num_images, 1, 2, 2, generator=generator)

    irs = IRSCallback(
        num_samples=4,
        sample_fn=sample_fn,
        feature="pixels",
        real_data=torch.rand(8, 1, 2, 2),
        evaluate_on=evaluate_on,
        log_images=False,
        compute_fid=False,
    )
    raw = RawWeights()
    averaging = EMAWeightAveraging(decay=0.5)
    callbacks = [raw, irs, averaging] if irs_first else [raw, averaging, irs]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, Scalar(), callbacks, False, max_epochs=1, limit_val_batches=1)
    warned = any("will score the current (non-averaged) weights" in str(w.message) for w in record)
    assert warned == (scores == "raw")
    expected = ema(raw.values, 0.5) if scores == "averaged" else raw.values[-1]
    assert len(raw.values) == 4
    assert abs(ema(raw.values, 0.5) - raw.values[-1]) > 0.05  # the two candidates are far apart
    assert seen == [pytest.approx(expected, abs=1e-6)]


def test_pipeline_sampling_leaves_training_unchanged(tmp_path):
    def run(with_callback: bool) -> list[float]:
        pl.seed_everything(3, verbose=False)
        module = TinyDiffusion(training_images())
        callbacks = [irs_callback(every_n_train_steps=1, log_images=False, num_samples=4)] if with_callback else []
        fit(tmp_path, module, callbacks, False, max_epochs=1, limit_train_batches=2)
        return module.losses

    reference = run(False)
    assert run(True) == reference
    assert len(reference) == 2


def test_pipeline_attribute_is_used_directly(tmp_path, capfd):
    module = TinyDiffusion(training_images())
    pipe = module.pipeline()
    pipe.set_progress_bar_config(desc="user-bar")
    module.pipeline = pipe  # a pipeline object instead of a method
    irs = irs_callback(num_samples=4, log_images=False, compute_fid=False)
    fit(tmp_path, module, [irs], False, max_epochs=1, limit_train_batches=1)
    assert "user-bar" not in capfd.readouterr().err  # no bar inside `fit`
    pipe(batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert "user-bar" in capfd.readouterr().err  # the user's own bar configuration is back afterwards
    del module.generated[1:]
    assert [batch.shape for batch in module.generated] == [(4, 8, 8, 1)]
    assert irs.history[0]["num_samples"] == 4
    assert irs.history[0]["irs_inf"] == pytest.approx(expected_scores(module, 0)[0], abs=1e-12)
    assert re.fullmatch(r"IRSCallback\{.*'prefix': 'irs/'.*\}", irs.state_key)
