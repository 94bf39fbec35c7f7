# SPDX-License-Identifier: Apache-2.0
"""IRSCallback with a trivial generator module: configuration errors, sampling hygiene, state, precision loop."""

import re
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diadm.callback import IRSCallback, _check_images, _default_batch_to_images, _rank_share, _rank_zero_rows
from diadm.estimator import estimate_irs
from diadm.features import PixelFeatures

NUM_REAL = 24
SIDE = 4


def real_images(num: int = NUM_REAL, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


class ToyGenerator(pl.LightningModule):
    """Learns one scalar with a noisy loss; samples perturbed copies of the training images it holds.

    The loss draws from torch's global generator and the loader shuffles, so any leak of the callback into the
    global random state changes the loss curve.
    """

    def __init__(self, images: torch.Tensor, with_sample: bool = True) -> None:
        super().__init__()
        self.images = images
        self.shift = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Linear(1, 1).eval()  # a submodule the user keeps in eval mode
        self.losses: list[float] = []
        self.modes: list[tuple[bool, bool]] = []
        self.sample_calls: list[tuple[bool, bool, bool]] = []
        if with_sample:
            self.sample = self._sample

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.modes.append((self.training, self.frozen.training))
        loss = (self.shift - batch[0].mean() - 0.1 * torch.rand(())) ** 2
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=8, shuffle=True)

    def _sample(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        self.sample_calls.append((self.training, self.frozen.training, torch.is_grad_enabled()))
        picks = torch.randint(0, self.images.shape[0], (num_images,), generator=generator)
        noise = 0.02 * torch.rand(num_images, 1, SIDE, SIDE, generator=generator)
        return (self.images[picks] + noise).clamp(0, 1)


class WithValidation(ToyGenerator):
    """ToyGenerator with a validation loop over its first eight images."""

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        pass

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images[:8]), batch_size=8)


class Recorder:
    """A `sample_fn` that records what it returns."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.returned: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def __call__(self, pl_module: pl.LightningModule, num_images: int, generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, self.images.shape[0], (num_images,), generator=generator)
        out = self.images[picks]
        self.returned.append(out)
        self.sizes.append(num_images)
        return out


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def steps_of(self, key: str) -> list[int | None]:
        return [step for step, metrics in self.calls if key in metrics]


def make_trainer(tmp_path, callbacks, max_epochs: int = 1, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def callback(**kwargs) -> IRSCallback:
    kwargs.setdefault("num_samples", 16)
    kwargs.setdefault("feature", "pixels")
    kwargs.setdefault("log_images", False)
    return IRSCallback(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"every_n_epochs": 1, "every_n_train_steps": 5},
            ValueError,
            "`IRSCallback` takes one interval, got both `every_n_epochs=1` and `every_n_train_steps=5`;"
            " pass only one of them.",
        ),
        (
            {"num_samples": 1},
            ValueError,
            "`num_samples` must be an integer of at least 2 (IRS and FID need two samples), got 1;",
        ),
        ({"every_n_epochs": 0}, ValueError, "`every_n_epochs` must be a positive integer or None, got 0"),
        ({"every_n_train_steps": 2.5}, ValueError, "`every_n_train_steps` must be a positive integer or None, got 2.5"),
        ({"evaluate_on": "test_end"}, ValueError, "`evaluate_on` must be one of ('train_epoch_end',"),
        ({"sampler_order": ("sample", "magic")}, ValueError, "`sampler_order` must be a non-empty sequence of names"),
        ({"sample_fn": 3}, TypeError, "`sample_fn` must be callable as `sample_fn(pl_module, num_images, generator)`"),
        ({"batch_to_images": "images"}, TypeError, "`batch_to_images` must be callable, got str."),
        (
            {"real_data": torch.zeros(2, 1, 2, 2), "real_features": torch.zeros(2, 4)},
            ValueError,
            "got both `real_data` and `real_features`; pass only one of them.",
        ),
        (
            {"held_out_data": torch.zeros(2, 1, 2, 2), "held_out_features": torch.zeros(2, 4)},
            ValueError,
            "got both `held_out_data` and `held_out_features`; pass only one of them.",
        ),
        ({"target_ci_width": 0.0}, ValueError, "`target_ci_width` must be in (0, 1] (a width of the `irs_inf`"),
        (
            {"max_samples": 100},
            ValueError,
            "`max_samples=100` caps the sampling of `target_ci_width`, which is None;",
        ),
        (
            {"target_ci_width": 0.1, "max_samples": 8},
            ValueError,
            "`max_samples` must be an integer of at least `num_samples` (16), got 8.",
        ),
        (
            {"target_ci_width": 0.1, "max_samples": 100.0},
            ValueError,
            "`max_samples` must be an integer of at least `num_samples` (16), got 100.0.",
        ),
        ({"target_ci_width": "0.1"}, ValueError, "`target_ci_width` must be in (0, 1] (a width of the `irs_inf`"),
        ({"sample_batch_size": 0}, ValueError, "`sample_batch_size` must be a positive integer, got 0."),
        ({"num_images": 0}, ValueError, "`num_images` must be a positive integer, got 0."),
        ({"prefix": None}, TypeError, "`prefix` must be a string, got NoneType."),
        ({"compute_fid": "no"}, TypeError, "`compute_fid` must be a bool, got 'no' (str)."),
        ({"log_images": 1}, TypeError, "`log_images` must be a bool, got 1 (int)."),
        ({"seed": 1.5}, TypeError, "`seed` must be an int, got 1.5 (float)."),
        ({"alpha_e": 0.5}, ValueError, "`alpha_e` must lie in the open interval (0, 0.5), got 0.5;"),
        ({"alpha_e": "0.05"}, ValueError, "`alpha_e` must be a float in (0, 0.5), got '0.05' (str);"),
    ],
    ids=[
        "both-intervals",
        "num-samples-1",
        "epochs-0",
        "steps-float",
        "evaluate-on",
        "sampler-order",
        "sample-fn",
        "batch-to-images",
        "real-twice",
        "held-out-twice",
        "width-0",
        "max-without-target",
        "max-below-num",
        "max-float",
        "width-str",
        "batch-0",
        "num-images-0",
        "prefix",
        "compute-fid-str",
        "log-images-int",
        "seed-float",
        "alpha-e-range",
        "alpha-e-str",
    ],
)
def test_constructor_rejects_bad_configuration(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        callback(**kwargs)


def test_setup_rejects_module_without_sampler(tmp_path):
    module = ToyGenerator(real_images(), with_sample=False)
    trainer = make_trainer(tmp_path, [callback(real_data=real_images())])
    with pytest.raises(ValueError, match=re.escape("`IRSCallback` found no way to sample ToyGenerator with")):
        trainer.fit(module)
    assert module.losses == []  # no training time spent


def test_setup_respects_sampler_order(tmp_path):
    # Only `sample` is tried, and the module has none, though a sample_fn was given.
    irs = callback(sample_fn=Recorder(real_images()), sampler_order=("sample",))
    with pytest.raises(ValueError, match=re.escape("with `sampler_order=('sample',)`: pass `sample_fn=")):
        make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images(), with_sample=False))


@pytest.mark.parametrize(
    ("logger", "names"), [(False, "no logger"), ("csv", "CSVLogger")], ids=["no-logger", "csv-logger"]
)
def test_setup_rejects_loggers_without_images(tmp_path, logger, names):
    if logger == "csv":
        logger = CSVLogger(tmp_path)
    module = ToyGenerator(real_images())
    trainer = make_trainer(tmp_path, [callback(log_images=True, real_data=real_images())], logger=logger)
    message = (
        "`IRSCallback(log_images=True)` needs a logger that can take images (TensorBoardLogger or"
        f" WandbLogger), got {names}; add one to `Trainer(logger=...)` or pass `log_images=False`."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(module)
    assert module.losses == []


def test_setup_rejects_two_callbacks_with_one_prefix(tmp_path):
    module = ToyGenerator(real_images())
    twins = [callback(real_data=real_images()), callback(real_data=real_images(), every_n_epochs=2)]
    message = (
        "Each `IRSCallback` of a trainer needs its own `prefix`, got 2 with `prefix='irs/'`, whose values would"
        " overwrite each other in the loggers; pass a distinct `prefix=` to each (for example `prefix='irs_fine/'`)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(tmp_path, twins).fit(module)
    assert module.losses == []


def test_other_loggers_are_skipped_with_one_warning_pointing_at_the_fit_call(tmp_path):
    loggers = [TensorBoardLogger(tmp_path), CSVLogger(tmp_path)]
    irs = callback(log_images=True, real_data=real_images(), every_n_train_steps=1)
    with pytest.warns(UserWarning, match=re.escape("`IRSCallback` cannot log pictures to CSVLogger;")) as record:
        make_trainer(tmp_path, [irs], logger=loggers).fit(ToyGenerator(real_images()))
    assert len(irs.history) == 3
    warned = [w for w in record if "cannot log pictures" in str(w.message)]
    assert len(warned) == 1  # once per callback, not once per evaluation
    assert warned[0].filename == __file__  # the user's `fit` line, not our code or Lightning's


def test_evaluation_hook_called_by_hand_before_setup_raises():
    irs = callback(real_data=real_images())
    loop = types.SimpleNamespace(epoch_loop=types.SimpleNamespace(_batches_that_stepped=1))
    trainer = types.SimpleNamespace(current_epoch=0, global_step=1, fit_loop=loop)
    message = "`IRSCallback` evaluates during `fit` only, after its `setup` has built the feature extractor, got an"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        irs.on_train_epoch_end(trainer, types.SimpleNamespace(device=torch.device("cpu")))


def test_validate_outside_fit_leaves_the_callback_idle(tmp_path):
    irs = callback(real_data=real_images(), evaluate_on="validation_epoch_end")
    make_trainer(tmp_path, [irs]).validate(WithValidation(real_images()), verbose=False)
    assert irs.history == []


def test_pictures_pair_each_sample_with_its_nearest_training_image(tmp_path, monkeypatch):
    import diadm.callback

    grids: list[torch.Tensor] = []
    make_grid = diadm.callback._make_grid
    monkeypatch.setattr(
        diadm.callback, "_make_grid", lambda images, columns: grids.append(images) or make_grid(images, columns)
    )
    real = real_images()
    returned: list[torch.Tensor] = []

    def sample_fn(pl_module, num_images, generator):
        picks = torch.randint(0, NUM_REAL, (num_images,), generator=generator)
        returned.append((real[picks] + 0.01 * torch.rand(num_images, 1, SIDE, SIDE, generator=generator)).clamp(0, 1))
        return returned[-1]

    # Rounds of 4 until the cap of 12: the 6 pictured samples span two rounds.
    irs = callback(
        log_images=True,
        real_data=real,
        sample_fn=sample_fn,
        num_samples=4,
        num_images=6,
        target_ci_width=1e-6,
        max_samples=12,
        compute_fid=False,
    )
    make_trainer(tmp_path, [irs], logger=TensorBoardLogger(tmp_path)).fit(ToyGenerator(real))
    samples, pairs = grids[0], grids[1]
    expected = torch.cat(returned)[:6]
    nearest = torch.cdist(expected.flatten(1).double(), real.flatten(1).double()).argmin(dim=1)
    assert torch.equal(samples[:, :1], expected)  # grey images shown as three equal channels
    assert torch.equal(pairs[0::2, :1], expected)
    assert torch.equal(pairs[1::2, :1], real[nearest])


def test_precomputed_real_features_skip_lookup_pictures_with_a_warning(tmp_path):
    features = PixelFeatures()(real_images())
    irs = callback(log_images=True, real_features=features)
    with pytest.warns(UserWarning, match=re.escape("`IRSCallback` cannot look up training images by index")):
        make_trainer(tmp_path, [irs], logger=TensorBoardLogger(tmp_path)).fit(ToyGenerator(real_images()))
    assert irs.history[0]["num_samples"] == 16


# ------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    ("total", "world", "shares"),
    [(10, 1, [10]), (10, 2, [5, 5]), (11, 2, [6, 5]), (5, 3, [2, 2, 1]), (1, 2, [1, 0])],
    ids=["single", "even", "odd", "three", "fewer-than-ranks"],
)
def test_rank_share(total, world, shares):
    assert [_rank_share(total, world, rank) for rank in range(world)] == shares
    assert sum(shares) == total


@pytest.mark.parametrize(
    ("round_sizes", "world", "limit", "rows"),
    [
        ([6, 6, 3], 1, 10, list(range(10))),
        ([5, 5], 2, 16, [0, 1, 2, 5, 6, 7]),  # 3 + 2 per round: rank 1's rows 3, 4, 8, 9 are skipped
        ([5, 5], 2, 4, [0, 1, 2, 5]),
        ([1, 1], 2, 4, [0, 1]),
    ],
    ids=["one-rank", "two-ranks-two-rounds", "limit", "rank-one-empty"],
)
def test_rank_zero_rows(round_sizes, world, limit, rows):
    assert _rank_zero_rows(round_sizes, world, limit).tolist() == rows


def test_default_batch_to_images():
    images = torch.zeros(2, 1, 2, 2)
    assert _default_batch_to_images(images) is images
    assert _default_batch_to_images((images, torch.ones(2))) is images
    assert _default_batch_to_images({"label": torch.ones(2), "pixel_values": images}) is images
    with pytest.raises(TypeError, match=re.escape("pass `batch_to_images=` to extract (N, C, H, W) images in [0, 1]")):
        _default_batch_to_images({"label": torch.ones(2)})


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.zeros(2, 2, 2), ValueError, "`x` must have shape (N, C, H, W) with C in (1, 3), got shape (2, 2, 2)."),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.int32),
            TypeError,
            "`x` must be uint8 or floating, got dtype torch.int32.",
        ),
        (
            torch.full((2, 1, 2, 2), -1.0),
            ValueError,
            "`x` must hold floats in [0, 1], got values in [-1, -1]; map diffusion outputs in [-1, 1] with",
        ),
        ([1, 2], TypeError, "`x` must be a torch.Tensor of images, got list."),
    ],
    ids=["3d", "int32", "minus-one", "list"],
)
def test_check_images(images, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _check_images("x", images)


def test_sampler_output_in_minus_one_to_one_is_rejected(tmp_path):
    irs = callback(real_data=real_images(), sample_fn=lambda module, num, generator: torch.full((num, 1, 4, 4), -1.0))
    with pytest.raises(ValueError, match=re.escape("`images returned by the 'sample_fn' sampler` must hold floats")):
        make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images()))


# ------------------------------------------------------------------------------------------------------------------
# Sampling hygiene and values


def test_values_match_an_independent_recomputation(tmp_path):
    real = real_images()
    recorder = Recorder(real[:12])  # reproduces half of the training set
    irs = callback(real_data=real, sample_fn=recorder, compute_fid=False, sample_batch_size=5)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real))
    assert recorder.sizes == [5, 5, 5, 1]
    synthetic = torch.cat(recorder.returned).flatten(1)
    nearest = torch.cdist(synthetic.double(), real.flatten(1).double()).argmin(dim=1)
    expected = estimate_irs(NUM_REAL, 16, nearest.unique().numel())
    entry = irs.history[0]
    assert entry["n_learned"] == expected.n_learned
    assert entry["irs_inf"] == pytest.approx(expected.irs_inf, abs=1e-12)
    assert entry["irs_inf_upper"] == pytest.approx(expected.irs_inf_upper, abs=1e-12)
    assert entry["n_learned"] <= 12  # only the first 12 training images can be retrieved


def test_sampling_is_eval_mode_without_grad_and_modes_are_restored(tmp_path):
    module = ToyGenerator(real_images())
    irs = callback(real_data=real_images(), every_n_train_steps=1, sample_batch_size=8)
    make_trainer(tmp_path, [irs]).fit(module)
    assert module.sample_calls == [(False, False, False)] * 6  # 3 evaluations x 2 batches
    assert module.modes == [(True, False)] * 3  # training mode back, the frozen submodule still in eval


def test_training_loss_curve_is_unchanged_by_the_callback(tmp_path):
    def run(with_callback: bool) -> list[float]:
        pl.seed_everything(7, verbose=False)
        module = ToyGenerator(real_images())
        callbacks = [callback(every_n_train_steps=1)] if with_callback else []  # real data: the train loader
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(module)
        return module.losses

    without = run(False)
    assert run(True) == without
    assert len(without) == 6


def test_compute_fid_false_builds_and_logs_no_fid(tmp_path, monkeypatch):
    import torchmetrics.image.fid

    def refuse(*args, **kwargs):
        raise AssertionError("FrechetInceptionDistance was built with compute_fid=False")

    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", refuse)
    logger = RecordingLogger()
    irs = callback(real_data=real_images(), compute_fid=False)
    trainer = make_trainer(tmp_path, [irs], logger=logger)
    trainer.fit(ToyGenerator(real_images()))
    assert "fid" not in irs.history[0]
    assert "irs/fid" not in trainer.callback_metrics
    assert (logger.steps_of("irs/fid"), logger.steps_of("irs/irs_inf")) == ([], [2])


def test_fid_is_logged_and_matches_torchmetrics_on_the_features(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = real_images(64)
    recorder = Recorder(real_images(64, seed=1))
    irs = callback(real_data=real, sample_fn=recorder, num_samples=32)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real))
    flatten = nn.Flatten()
    flatten.num_features = SIDE * SIDE  # FID reads the width from this attribute
    reference = FrechetInceptionDistance(feature=flatten, reset_real_features=False)
    reference.update(real, real=True)
    reference.update(torch.cat(recorder.returned), real=False)
    # Same double-precision statistics on identical features; only the summation order may differ.
    assert irs.history[0]["fid"] == pytest.approx(reference.compute().item(), rel=1e-5)


def test_target_ci_width_stops_at_the_first_round_narrow_enough(tmp_path):
    real = real_images()
    recorder = Recorder(real)
    irs = callback(real_data=real, sample_fn=recorder, num_samples=8, target_ci_width=0.3, max_samples=400)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real))
    used = irs.history[0]["num_samples"]
    # Independent replay: the first multiple of 8 whose interval is narrower than the target.
    synthetic = torch.cat(recorder.returned).flatten(1)
    nearest = torch.cdist(synthetic.double(), real.flatten(1).double()).argmin(dim=1)
    expected = None
    for total in range(8, 401, 8):
        estimate = estimate_irs(NUM_REAL, total, nearest[:total].unique().numel())
        if estimate.irs_inf_upper - estimate.irs_inf_lower < 0.3:
            expected = total
            break
    assert expected is not None
    assert expected > 8
    assert used == expected == synthetic.shape[0]
    assert irs.history[0]["irs_inf_upper"] - irs.history[0]["irs_inf_lower"] < 0.3


def test_target_ci_width_stops_at_max_samples(tmp_path):
    irs = callback(real_data=real_images(), num_samples=6, target_ci_width=1e-6, max_samples=15, compute_fid=False)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images()))
    assert irs.history[0]["num_samples"] == 15  # 6 + 6 + 3: the last round is cut to the cap


class LogsReferences(WithValidation):
    """Logs a training loss per step and per epoch, and a validation value, as a user would."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=8)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_value", 1.0, batch_size=8)


@pytest.mark.parametrize(
    ("kwargs", "log_every_n_steps", "steps", "reference"),
    [
        ({"every_n_train_steps": 2}, 1, [1, 3, 5], "train_loss_step"),
        ({"every_n_train_steps": 2}, 50, [1, 3, 5], None),
        ({"evaluate_on": "train_epoch_end"}, 50, [2, 5], "train_loss_epoch"),
        ({"evaluate_on": "validation_epoch_end"}, 50, [2, 5], "val_value"),
    ],
    ids=["step-interval", "step-interval-sparse-logging", "train-epoch-end", "validation-epoch-end"],
)
def test_logger_steps_follow_lightning(tmp_path, kwargs, log_every_n_steps, steps, reference):
    logger = RecordingLogger()
    module = LogsReferences(real_images())  # 3 batches per epoch, 2 epochs
    irs = callback(real_data=real_images(), compute_fid=False, **kwargs)
    trainer = make_trainer(tmp_path, [irs], max_epochs=2, logger=logger, log_every_n_steps=log_every_n_steps)
    trainer.fit(module)
    # The history keeps `trainer.global_step`; the loggers get Lightning's 0-based step of the same batch.
    assert [entry["global_step"] for entry in irs.history] == [step + 1 for step in steps]
    assert logger.steps_of("irs/irs_inf") == steps  # every evaluation, whatever `log_every_n_steps`
    if reference == "train_loss_step":
        # Lightning filed the loss of global batch s (0-based) under step s, the step our score of it has.
        logged = {step: metrics[reference] for step, metrics in logger.calls if reference in metrics}
        assert [logged[step] for step in steps] == pytest.approx([module.losses[step] for step in steps])
    elif reference is not None:
        assert logger.steps_of(reference) == steps  # the same steps as Lightning's own epoch-end values


# ------------------------------------------------------------------------------------------------------------------
# State, resumption, two instances


def test_state_dict_round_trip(tmp_path):
    irs = callback(real_data=real_images(), every_n_train_steps=2, compute_fid=False)
    make_trainer(tmp_path, [irs], max_epochs=2).fit(ToyGenerator(real_images()))
    state = irs.state_dict()
    assert [entry["global_step"] for entry in state["history"]] == [2, 4, 6]
    restored = callback(real_data=real_images(), every_n_train_steps=2)
    restored.load_state_dict(state)
    assert restored.history == irs.history
    assert restored.last_evaluated_step == 6
    assert restored.history[1]["irs_inf"] == irs.history[1]["irs_inf"]
    state["history"][0]["irs_inf"] = -1.0  # the restored copy does not alias the saved state
    assert restored.history[0]["irs_inf"] != -1.0


def test_resume_from_checkpoint_keeps_history_and_skips_the_evaluated_step(tmp_path):
    real = real_images()
    first = callback(real_data=real, compute_fid=False)
    trainer = make_trainer(tmp_path, [first], max_epochs=1, enable_checkpointing=True)
    trainer.fit(ToyGenerator(real))
    checkpoint = trainer.checkpoint_callback.best_model_path
    second = callback(real_data=real, compute_fid=False)
    make_trainer(tmp_path, [second], max_epochs=2).fit(ToyGenerator(real), ckpt_path=checkpoint)
    assert [entry["global_step"] for entry in second.history] == [3, 6]
    assert second.history[0] == first.history[0]


def test_a_second_fit_with_the_same_callback_evaluates_again_on_the_first_real_features(tmp_path):
    extractor = CountingPixels()
    irs = IRSCallback(num_samples=4, feature=extractor, log_images=False, compute_fid=False)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images()))
    assert extractor.seen == NUM_REAL + 4
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images(seed=1)))
    # The new fit's epoch 0 ends at step 3 too, and is not taken for the step already evaluated; the history runs
    # on, and the real features of the first fit are kept (documented): only the 4 new samples are extracted.
    assert [entry["global_step"] for entry in irs.history] == [3, 3]
    assert extractor.seen == NUM_REAL + 4 + 4


def test_two_instances_coexist_in_one_checkpoint(tmp_path):
    real = real_images()

    def pair() -> list[IRSCallback]:
        return [
            callback(real_data=real, prefix="coarse/", num_samples=4, compute_fid=False),
            callback(real_data=real, prefix="fine/", num_samples=32, compute_fid=False),
        ]

    coarse, fine = pair()
    assert coarse.state_key != fine.state_key
    trainer = make_trainer(tmp_path, [coarse, fine], enable_checkpointing=True)
    trainer.fit(ToyGenerator(real))
    assert {"coarse/irs_inf", "fine/irs_inf"} <= set(trainer.callback_metrics)
    checkpoint = trainer.checkpoint_callback.best_model_path
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert saved[coarse.state_key]["history"][0]["num_samples"] == 4
    assert saved[fine.state_key]["history"][0]["num_samples"] == 32
    # Resumed, each new instance gets its own history back, then evaluates epoch 1 with its own sample count.
    resumed = pair()
    make_trainer(tmp_path, resumed, max_epochs=2).fit(ToyGenerator(real), ckpt_path=checkpoint)
    assert [entry["num_samples"] for entry in resumed[0].history] == [4, 4]
    assert [entry["num_samples"] for entry in resumed[1].history] == [32, 32]
    assert (resumed[0].history[0], resumed[1].history[0]) == (coarse.history[0], fine.history[0])


def test_same_configuration_twice_is_refused_by_lightning(tmp_path):
    real = real_images()
    twins = [callback(real_data=real), callback(real_data=real)]
    with pytest.raises(RuntimeError, match=re.escape("The `callback.state_key` must be unique among all callbacks")):
        make_trainer(tmp_path, twins).fit(ToyGenerator(real))


# ------------------------------------------------------------------------------------------------------------------
# Real and held-out features


class CountingPixels(nn.Module):
    """Pixel features that count the images they see."""

    num_features = SIDE * SIDE

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        return images.float().flatten(1)


def test_disk_cache_skips_the_real_features_and_is_keyed_by_content(tmp_path):
    real = real_images()

    def run(data: torch.Tensor) -> int:
        extractor = CountingPixels()
        irs = IRSCallback(
            num_samples=4,
            feature=extractor,
            real_data=data,
            cache_dir=tmp_path / "cache",
            log_images=False,
            compute_fid=False,
        )
        make_trainer(tmp_path, [irs]).fit(ToyGenerator(real))
        return extractor.seen

    assert run(real) == NUM_REAL + 4  # real set + samples
    assert run(real.clone()) == 4  # same content: cache hit
    changed = real.clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]
    assert run(changed) == NUM_REAL + 4  # one pixel changed: miss
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_real_features_are_computed_once_across_evaluations(tmp_path):
    extractor = CountingPixels()
    irs = IRSCallback(num_samples=4, feature=extractor, every_n_train_steps=1, log_images=False, compute_fid=False)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images()))
    assert extractor.seen == NUM_REAL + 3 * 4  # train loader read once (in index order), then 3 x 4 samples


def test_held_out_from_the_validation_loader_gives_irs_adjusted(tmp_path):
    from diadm.functional import image_retrieval_score

    real, held_out = real_images(), real_images(16, seed=3)

    class HeldOutValidation(ToyGenerator):
        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            pass

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(held_out), batch_size=4)

    recorder = Recorder(real)
    irs = callback(real_data=real, sample_fn=recorder, compute_fid=False)
    trainer = make_trainer(tmp_path, [irs], num_sanity_val_steps=0)
    trainer.fit(HeldOutValidation(real))
    expected = image_retrieval_score(real.flatten(1), torch.cat(recorder.returned).flatten(1), held_out.flatten(1))
    assert irs.history[0]["irs_adjusted"] == pytest.approx(expected.irs_adjusted, abs=1e-12)
    assert trainer.callback_metrics["irs/irs_adjusted"].item() == pytest.approx(expected.irs_adjusted, abs=1e-6)


def test_no_held_out_without_validation(tmp_path):
    irs = callback(real_data=real_images(), compute_fid=False)
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real_images()))
    assert "irs_adjusted" not in irs.history[0]


def test_weight_averaging_warning_when_raw_weights_will_be_scored(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    irs = callback(real_data=real_images(), compute_fid=False)
    message = "`IRSCallback` will score the current (non-averaged) weights"
    with pytest.warns(UserWarning, match=re.escape(message)) as record:
        make_trainer(tmp_path, [irs, EMAWeightAveraging()]).fit(ToyGenerator(real_images()))
    assert [w.filename for w in record if message in str(w.message)] == [__file__]  # once, at the `fit` line
    quiet = callback(real_data=real_images(), compute_fid=False, evaluate_on="validation_epoch_end")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [quiet, EMAWeightAveraging()]).fit(WithValidation(real_images()))
    assert not [w for w in record if "non-averaged" in str(w.message)]
    assert len(quiet.history) == 1


def test_setup_rejects_validation_hook_without_validation(tmp_path):
    module = ToyGenerator(real_images())
    irs = callback(real_data=real_images(), evaluate_on="validation_epoch_end")
    message = (
        "`IRSCallback(evaluate_on='validation_epoch_end')` would never evaluate: this fit runs no validation"
        " (no validation dataloader, no `validation_step`, or `limit_val_batches=0`); pass"
        " `evaluate_on='train_epoch_end'` or enable validation."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(tmp_path, [irs]).fit(module)
    assert module.losses == []


def test_missing_extractor_weights_fail_in_setup_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = ToyGenerator(real_images())
    irs = IRSCallback(num_samples=4, feature="swav", real_data=real_images(), log_images=False)
    with pytest.raises(FileNotFoundError, match=re.escape("`swav` weights not found")):
        make_trainer(tmp_path, [irs]).fit(module)
    assert module.losses == []


def test_iterable_dataset_scores_but_skips_lookup_pictures(tmp_path):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from real_images()

    recorder = Recorder(real_images())
    irs = callback(log_images=True, real_data=DataLoader(Stream(), batch_size=8), sample_fn=recorder)
    with pytest.warns(UserWarning, match=re.escape("(precomputed `real_features` or an IterableDataset)")):
        make_trainer(tmp_path, [irs], logger=TensorBoardLogger(tmp_path)).fit(ToyGenerator(real_images()))
    nearest = torch.cdist(torch.cat(recorder.returned).flatten(1), real_images().flatten(1)).argmin(dim=1)
    assert irs.history[0]["n_learned"] == nearest.unique().numel()


def test_validation_hook_evaluates_at_every_validation_run_of_a_selected_epoch(tmp_path):
    class SixStepValidation(ToyGenerator):
        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.images), batch_size=4)  # 6 steps per epoch

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.images[:4]), batch_size=4)

    irs = callback(real_data=real_images(), evaluate_on="validation_epoch_end", every_n_epochs=2, compute_fid=False)
    make_trainer(tmp_path, [irs], max_epochs=2, val_check_interval=0.5).fit(SixStepValidation(real_images()))
    # Epoch 0 is skipped; epoch 1 validates twice (steps 9 and 12), the sanity check never counts.
    assert [(entry["epoch"], entry["global_step"]) for entry in irs.history] == [(1, 9), (1, 12)]
    assert "irs_adjusted" in irs.history[0]  # the validation loader is the held-out set by default


@pytest.mark.parametrize("kind", ["held_out_data", "held_out_features"])
def test_held_out_given_as_an_argument(tmp_path, kind):
    from diadm.functional import image_retrieval_score

    real, held_out = real_images(), real_images(16, seed=3)
    recorder = Recorder(real[:6])  # covers a quarter of the training set
    value = held_out if kind == "held_out_data" else held_out.flatten(1)
    irs = callback(real_data=real, sample_fn=recorder, compute_fid=False, **{kind: value})
    make_trainer(tmp_path, [irs]).fit(ToyGenerator(real))
    expected = image_retrieval_score(real.flatten(1), torch.cat(recorder.returned).flatten(1), held_out.flatten(1))
    assert irs.history[0]["irs_adjusted"] == pytest.approx(expected.irs_adjusted, abs=1e-12)
    assert irs.history[0]["irs_inf"] < 0.5  # the sampler covers a quarter of the training set
    assert irs.history[0]["irs_adjusted"] == pytest.approx(irs.history[0]["irs_inf"] / expected.test.irs_inf)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"sample_fn": lambda module, num, generator: torch.rand(num + 1, 1, SIDE, SIDE, generator=generator)},
            ValueError,
            "The 'sample_fn' sampler must return 16 images, got 17; return exactly `num_images` images per call",
        ),
        (
            {"real_data": [torch.zeros(1, SIDE, SIDE)]},
            TypeError,
            "`real_data` must be an image tensor, a Dataset or a DataLoader, got list; pass one, or precomputed",
        ),
        (
            {"real_data": torch.zeros(0, 1, SIDE, SIDE)},
            ValueError,
            "`real_data` holds no images; pass a non-empty image set.",
        ),
        (
            {"real_data": torch.full((2, 1, SIDE, SIDE), 2.0)},
            ValueError,
            "`real_data` must hold floats in [0, 1], got values in [2, 2];",
        ),
    ],
    ids=["wrong-count", "list-source", "empty-source", "real-out-of-range"],
)
def test_evaluation_errors(tmp_path, kwargs, error, message):
    kwargs.setdefault("real_data", real_images())
    with pytest.raises(error, match=re.escape(message)):
        make_trainer(tmp_path, [callback(**kwargs)]).fit(ToyGenerator(real_images()))


def test_several_validation_loaders_need_an_explicit_held_out_set(tmp_path):
    class TwoValidationSets(ToyGenerator):
        def validation_step(self, batch: list[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
            pass

        def val_dataloader(self) -> dict[str, DataLoader]:
            return {"a": DataLoader(TensorDataset(self.images), batch_size=8)}

    irs = callback(real_data=real_images(), compute_fid=False)
    message = "`held_out_data='val'` needs one validation DataLoader, got dict; pass `held_out_data=`"
    with pytest.raises(TypeError, match=re.escape(message)):
        make_trainer(tmp_path, [irs], num_sanity_val_steps=0).fit(TwoValidationSets(real_images()))
