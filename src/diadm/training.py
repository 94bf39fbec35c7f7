# SPDX-License-Identifier: Apache-2.0
"""Fine-tune an unconditional diffusers model into DiADM, or train its unconditional baseline, with Lightning.

`DiADMModule` is a `LightningModule` that owns the denoiser, its noise scheduler, the training images and (for DiADM)
the bank of their feature vectors. The features are computed once when the module is built (and cached on disk when
a cache folder is given, keyed by the content of the images and the extractor's fingerprint); the images of a latent
model are encoded once, too. Training is the usual noise-prediction objective; mixed precision, gradient
accumulation, devices and checkpointing come from the `Trainer`.
"""

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, LDMPipeline, VQModel
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.ddpm.pipeline_ddpm import DDPMPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from diadm.cache import FeatureCache, cached, fingerprint
from diadm.features import extractor_fingerprint, get_feature_extractor
from diadm.features.base import to_unit_float
from diadm.io import IMAGE_SUFFIXES, find_images, load_image
from diadm.models.feature_conditioned_unet import FeatureConditionedUNet

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# Version of the feature-cache key layout: bump it when the way training features are computed changes.
_CACHE_VERSION = "diadm-training-features-1"
# Key under which the fingerprint of the training data is stored in Lightning checkpoints.
_DATA_KEY = "diadm_train_data_fingerprint"
# Key under which the states of the module's own generators (`seed` given) are stored in Lightning checkpoints.
_RNG_KEY = "diadm_generator_states"


_GENERATOR_NAMES = ("data", "noise", "dropout")


def _seeded_generators(seed: int) -> dict[str, torch.Generator]:
    """Independent CPU generators derived from `seed`: for the data order, the noise and timesteps, condition dropout.

    Dropout has its own stream so that DiADM's draws do not shift the noise its baseline (which draws none) also gets.
    """
    children = np.random.SeedSequence(seed).spawn(len(_GENERATOR_NAMES))
    # 63 bits: `manual_seed` takes any non-negative int below 2**64, and the top bit is not needed.
    seeds = [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]
    return {name: torch.Generator().manual_seed(value) for name, value in zip(_GENERATOR_NAMES, seeds, strict=True)}


def _check_num_images(num_images: Any) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int):
        raise TypeError(f"`num_images` must be an integer, got {num_images!r} ({type(num_images).__name__}).")
    if num_images < 1:
        raise ValueError(f"`num_images` must be at least 1, got {num_images}.")


def ema_decay_at(step: int, decay: float) -> float:
    """Return the EMA decay used for the update after `step` earlier updates: `min(decay, (1 + step) / (10 + step))`.

    The warm-up term keeps early averages from being dominated by the random or pretrained start (the same form as
    the warm-up of diffusers' `EMAModel`, offset so that the first update uses 1/10).

    Args:
        step: The number of EMA updates already applied (0 for the first update).
        decay: The final decay, in [0, 1).

    Returns:
        The decay for this update.

    Example:
        >>> ema_decay_at(0, 0.999), ema_decay_at(90, 0.999), ema_decay_at(10**6, 0.999)
        (0.1, 0.91, 0.999)
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def load_image_folder(folder: str | os.PathLike, *, size: int, channels: int) -> Tensor:
    """Load every image file under `folder` as float32 in [0, 1], square, at the UNet's size.

    Files are found and decoded by `diadm.io` (PNG, JPEG and WebP, recursively, sorted by relative path, hidden files
    left out, decoded to RGB), so `diadm finetune` and `diadm score` read a folder alike. Each image is then converted
    to luma (`channels=1`, PIL's "L" mode) or kept RGB, resized so its short side is `size` (bicubic) and
    centre-cropped to `size` x `size`.

    Args:
        folder: The folder to search.
        size: The side of the square images, usually the UNet's `sample_size`.
        channels: 1 or 3.

    Returns:
        A float32 tensor of shape (N, channels, size, size).

    Raises:
        TypeError: If `size` or `channels` is not an integer.
        ValueError: If `folder` is not a folder or holds no image, `size` is not positive or `channels` not 1 or 3.
        diadm.io.UnreadableFileError: If a file cannot be decoded.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     Image.new("RGB", (6, 4), (255, 0, 0)).save(f"{folder}/red.png")
        ...     images = load_image_folder(folder, size=2, channels=3)
        >>> images.shape, images[0, :, 0, 0].tolist()
        (torch.Size([1, 3, 2, 2]), [1.0, 0.0, 0.0])
    """
    for name, value in (("size", size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    if size < 1:
        raise ValueError(f"`size` must be a positive integer, got {size}.")
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 (grayscale) or 3 (RGB), got {channels}.")
    files = find_images(folder)
    if not files:
        raise ValueError(
            f"`folder` must hold at least one image ({', '.join(IMAGE_SUFFIXES)}), found none under {str(folder)!r}."
        )
    arrays = []
    for path in files:
        rgb = Image.fromarray(load_image(path).permute(1, 2, 0).numpy())
        converted = rgb.convert("L") if channels == 1 else rgb
        scale = size / min(converted.size)
        width, height = max(size, round(converted.width * scale)), max(size, round(converted.height * scale))
        resized = converted.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        cropped = resized.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(cropped, dtype=np.uint8).reshape(size, size, channels))
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return stacked.to(torch.float32) / 255.0


def _as_images(train_images: Any) -> Tensor:
    """Check training images (tensor or array, (N, C, H, W), uint8 or float in [0, 1]) and return float32 in [0, 1]."""
    if isinstance(train_images, Dataset):
        raise NotImplementedError(
            "`train_images` as a torch Dataset is not supported: DiADMModule keeps the training images in memory and"
            " indexes them together with their features. Stack them into one (N, C, H, W) tensor first, for example"
            " `torch.stack([dataset[i] for i in range(len(dataset))])`."
        )
    if isinstance(train_images, np.ndarray):
        train_images = torch.from_numpy(train_images)
    if not isinstance(train_images, Tensor):
        raise TypeError(
            "`train_images` must be a torch.Tensor or numpy array of shape (N, C, H, W), got"
            f" {type(train_images).__name__}."
        )
    images = to_unit_float(train_images, "train_images")
    if images.shape[0] < 1:
        raise ValueError("`train_images` must hold at least one image, got 0.")
    return images.cpu()


def load_pretrained(
    pretrained: str | os.PathLike | DiffusionPipeline | UNet2DModel | FeatureConditionedUNet,
) -> tuple[Any, Any, Any]:
    """Return the `(unet, scheduler, autoencoder)` of a diffusers pipeline or model, loading folders from disk.

    Args:
        pretrained: A pipeline folder (with `model_index.json`: `DDPMPipeline`, `DDIMPipeline`, `LDMPipeline`,
            `DiADMPipeline`), a `UNet2DModel` folder (with `config.json`), or a pipeline, `UNet2DModel` or
            `FeatureConditionedUNet` object.

    Returns:
        The denoiser, the scheduler (None for a bare model) and the `vqvae`/`vae` (None for pixel models).

    Raises:
        TypeError: If `pretrained` is of another type.
        ValueError: If a folder holds neither file, or a pipeline has no `unet`.

    Example:
        >>> from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, **blocks)
        >>> found = load_pretrained(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
        >>> [type(part).__name__ for part in found]
        ['UNet2DModel', 'DDPMScheduler', 'NoneType']
    """
    if isinstance(pretrained, str | os.PathLike):
        path = Path(pretrained)
        if (path / "model_index.json").is_file():
            pretrained = DiffusionPipeline.from_pretrained(path)
        elif (path / "config.json").is_file():
            return UNet2DModel.from_pretrained(path), None, None
        else:
            raise ValueError(
                "`pretrained` must be a diffusers pipeline folder (with model_index.json) or a UNet2DModel folder"
                f" (with config.json), got {str(path)!r}, which holds neither; save one with"
                " `pipeline.save_pretrained(folder)`."
            )
    if isinstance(pretrained, DiffusionPipeline):
        components = pretrained.components
        if "unet" not in components:
            raise ValueError(
                f"`pretrained` must be an unconditional image pipeline with a `unet`, got {type(pretrained).__name__}"
                f" with components {sorted(components)}."
            )
        autoencoder = components.get("vqvae", components.get("vae"))
        return components["unet"], components.get("scheduler"), autoencoder
    if isinstance(pretrained, UNet2DModel | FeatureConditionedUNet):
        return pretrained, None, None
    raise TypeError(
        "`pretrained` must be a folder path, a diffusers pipeline (DDPMPipeline, DDIMPipeline, LDMPipeline,"
        f" DiADMPipeline), a UNet2DModel or a FeatureConditionedUNet, got {type(pretrained).__name__}."
    )


def image_size(unet: Any, autoencoder: Any = None) -> int:
    """The side of the square training images a (latent) UNet expects.

    For pixel models that is the UNet's `sample_size`; for latent models, `sample_size` times the autoencoder's
    downsampling factor `2 ** (len(block_out_channels) - 1)`.

    Example:
        >>> from diffusers import UNet2DModel
        >>> image_size(UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
        ...                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
        8
    """
    inner = unet.unet if isinstance(unet, FeatureConditionedUNet) else unet
    size = inner.config.sample_size
    side = size if isinstance(size, int) else int(size[0])
    if autoencoder is None:
        return side
    return side * 2 ** (len(autoencoder.config.block_out_channels) - 1)


class DiADMModule(LightningModule):
    """Train a Diversity-Aware Diffusion Model (or its unconditional baseline) from a diffusers UNet.

    On construction the module (1) loads or copies the denoiser, scheduler and, for latent models, the autoencoder;
    (2) computes the feature vector of every training image with `feature` (or takes `train_features`), which
    becomes the feature bank DiADM samples from; (3) converts the UNet with `FeatureConditionedUNet.from_unet`, so
    at step 0 it predicts exactly what the pretrained model predicts; (4) for latent models, encodes the training
    images once. Each training step draws timesteps uniformly, adds noise with the scheduler and regresses the
    scheduler's `prediction_type` target (`epsilon`: the noise; `sample`: the clean input; `v_prediction`: the
    velocity) with the mean squared error, each image conditioned on its own feature vector. Condition dropout
    (inside `FeatureConditionedUNet`) trains the null path. AdamW with a linear warm-up, and an exponential moving
    average (EMA) of the weights updated after every optimizer step with decay `ema_decay_at(step, ema_decay)`.
    The EMA weights are the ones `sample`, `pipeline` and `save` use.

    With `conditional=False` the same module trains the unconditional baseline: the UNet is left unconditional and no
    features are computed, so both runs get the same data, budget, optimizer and EMA. Give both the same `seed` for
    the same data order, noise and timesteps at every step as well.

    Images are float tensors of shape (N, C, H, W) in [0, 1] (or uint8 in [0, 255]); pixel models see them mapped to
    [-1, 1], as diffusers' unconditional pipelines output them.

    Args:
        pretrained: A diffusers pipeline folder (`DDPMPipeline`, `DDIMPipeline`, `LDMPipeline` or `DiADMPipeline`),
            a `UNet2DModel` folder, or such objects. The objects are copied, never modified.
        train_images: The training images, (N, C, H, W), matching the UNet (pixel models) or the autoencoder.
        scheduler: The training noise scheduler; required when `pretrained` brings none.
        autoencoder: The `VQModel` or `AutoencoderKL` of a latent model, when `pretrained` brings none.
        feature: The feature extractor: a name for `diadm.features.get_feature_extractor`, or a module.
        train_features: Precomputed features (N, D) of `train_images`; then `feature` is not used.
        conditional: False trains the unconditional baseline.
        condition_dropout: Probability of training a sample on the null condition.
        learning_rate: AdamW learning rate after warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear learning-rate warm-up (0 for none).
        ema_decay: Final EMA decay in [0, 1); 0 keeps the EMA equal to the current weights.
        batch_size: Images per batch of the module's `train_dataloader`.
        num_workers: Workers of that data loader.
        sample_scheduler: The scheduler `sample`/`pipeline` use (for example a `DDIMScheduler`); defaults to the
            training scheduler.
        num_inference_steps: Denoising steps of `sample`.
        sample_batch_size: Images per pipeline call in `sample`.
        cache_dir: Folder of a `FeatureCache` for the training features, or None to always compute them.
        extraction_batch_size: Images per batch when computing features and latents.
        seed: Seeds the module's own generators for the data order (the shuffle of `train_dataloader`) and for the
            training noise and timesteps, and a third one for condition dropout, so that DiADM and its baseline built
            with the same `seed` see the same batches, noise and timesteps at every step; their states go into
            Lightning checkpoints, so a run resumed from a checkpoint written at the end of an epoch continues
            exactly. None draws all of them from the global generator (seed it with `seed_everything`): then the
            two runs see different batches and noise from the first step on, even after the same `seed_everything`,
            because converting the UNet (a fresh `UNet2DModel` is initialised before the weights are copied) and
            condition dropout consume that stream.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, the images do not fit the model, the features do not match the
            images, the scheduler's `prediction_type` is unknown, or a DiADM model is given with `conditional=False`.
        NotImplementedError: If `train_images` is a `Dataset`.

    Note:
        All training images (and latents) are kept in memory, and training batches come from the module's own
        `train_dataloader` (the features are looked up by image index). A `Dataset` raises `NotImplementedError`.
        Resuming from a Lightning checkpoint needs a module built with the same images: the checkpoint stores their
        fingerprint and `on_load_checkpoint` refuses another set. The data loader is not resumable, so a run resumed
        from a mid-epoch checkpoint reshuffles that epoch (Lightning warns); weights, optimizer, EMA and step count
        are restored exactly, and with `seed` so are the noise stream and the data-order generator (the resumed
        epoch then gets the next permutation, not the rest of the interrupted one).

    Note:
        `sample` conditions the samples on *distinct* bank rows by default (SPEC.md section 3). Their retrievals are
        then not independent draws, which the occupancy model behind `IRS_inf` assumes: with many samples they can
        retrieve more distinct training images than independent draws from the training set would, and `IRS_inf`
        saturates at 1 with collapsed bounds (the demo shows it). `distinct_features=False` draws rows
        independently, for a score that matches the model's assumption.

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    layers_per_block=1, norm_num_groups=8, **blocks)
        >>> images = torch.rand(6, 1, 8, 8)
        >>> module = DiADMModule(unet, images, scheduler=DDPMScheduler(num_train_timesteps=50), feature="pixels",
        ...                      num_inference_steps=2)
        >>> module.feature_bank.shape
        torch.Size([6, 64])
        >>> module.sample(3, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 1, 8, 8])
    """

    feature_bank: Tensor | None
    ema_num_updates: Tensor

    def __init__(
        self,
        pretrained: str | os.PathLike | DiffusionPipeline | UNet2DModel | FeatureConditionedUNet,
        train_images: Tensor | np.ndarray,
        *,
        scheduler: SchedulerMixin | None = None,
        autoencoder: nn.Module | None = None,
        feature: str | nn.Module | Callable[..., Tensor] = "swav",
        train_features: Tensor | np.ndarray | None = None,
        conditional: bool = True,
        condition_dropout: float = 0.1,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        batch_size: int = 64,
        num_workers: int = 0,
        sample_scheduler: SchedulerMixin | None = None,
        num_inference_steps: int = 50,
        sample_batch_size: int = 256,
        cache_dir: str | os.PathLike | None = None,
        extraction_batch_size: int = 256,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self._check_arguments(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            ema_decay=ema_decay,
            condition_dropout=condition_dropout,
            batch_size=batch_size,
            num_workers=num_workers,
            num_inference_steps=num_inference_steps,
            sample_batch_size=sample_batch_size,
            extraction_batch_size=extraction_batch_size,
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an integer or None, got {seed!r} ({type(seed).__name__}).")
        if seed is not None and seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer or None, got {seed}.")
        self.save_hyperparameters(
            "conditional",
            "condition_dropout",
            "learning_rate",
            "weight_decay",
            "warmup_steps",
            "ema_decay",
            "batch_size",
            "num_inference_steps",
            "seed",
        )
        self.conditional = bool(conditional)
        self.condition_dropout = float(condition_dropout)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.ema_decay = float(ema_decay)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.num_inference_steps = int(num_inference_steps)
        self.sample_batch_size = int(sample_batch_size)
        self.extraction_batch_size = int(extraction_batch_size)
        self.seed = seed
        # Empty without a seed: then everything draws from the global generator.
        self._generators = _seeded_generators(seed) if seed is not None else {}

        # 1. Components, copied so the caller's objects are never trained in place.
        unet, pretrained_scheduler, pretrained_autoencoder = load_pretrained(pretrained)
        scheduler = scheduler if scheduler is not None else pretrained_scheduler
        autoencoder = autoencoder if autoencoder is not None else pretrained_autoencoder
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(
                "`scheduler` must be a diffusers scheduler (for example DDPMScheduler) when `pretrained` brings none,"
                f" got {type(scheduler).__name__}."
            )
        prediction_type = cast(Any, scheduler).config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler's `prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}."
            )
        if sample_scheduler is not None and not isinstance(sample_scheduler, SchedulerMixin):
            raise TypeError(f"`sample_scheduler` must be a diffusers scheduler, got {type(sample_scheduler).__name__}.")
        if autoencoder is not None and not isinstance(autoencoder, VQModel | AutoencoderKL):
            raise TypeError(
                f"`autoencoder` must be a diffusers VQModel or AutoencoderKL, got {type(autoencoder).__name__}."
            )
        if isinstance(unet, FeatureConditionedUNet) and not self.conditional:
            raise ValueError(
                "`conditional=False` trains an unconditional baseline, but `pretrained` is already a"
                " FeatureConditionedUNet; pass its unconditional starting point (a UNet2DModel) instead."
            )
        self.scheduler: Any = scheduler
        self.sample_scheduler: Any = sample_scheduler if sample_scheduler is not None else scheduler
        self.prediction_type = prediction_type
        self.autoencoder: Any = None
        if autoencoder is not None:
            self.autoencoder = copy.deepcopy(autoencoder).eval().requires_grad_(False)

        # 2. Training images (float in [0, 1]) and what the denoiser sees: pixels in [-1, 1] or scaled latents.
        images = _as_images(train_images)
        self.train_images = images
        self.data_fingerprint = fingerprint(images)
        self._inputs = self._encode(images)
        inner_unet = unet.unet if isinstance(unet, FeatureConditionedUNet) else unet
        self._check_fit(inner_unet, self._inputs)

        # 3. Feature bank and denoiser.
        if self.conditional:
            features = self._features(images, feature, train_features, cache_dir)
            self.register_buffer("feature_bank", features, persistent=True)
            if isinstance(unet, FeatureConditionedUNet):
                if unet.config.feature_dim != features.shape[1]:
                    raise ValueError(
                        f"`pretrained` is a FeatureConditionedUNet with feature_dim={unet.config.feature_dim}, but the"
                        f" features have width {features.shape[1]}; use the extractor the model was trained with."
                    )
                self.unet = copy.deepcopy(unet)
            else:
                self.unet = FeatureConditionedUNet.from_unet(unet, features.shape[1], self.condition_dropout)
        else:
            self.feature_bank = None
            self.unet = copy.deepcopy(unet)
        self.unet.train()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.register_buffer("ema_num_updates", torch.zeros((), dtype=torch.long), persistent=True)

    @staticmethod
    def _check_arguments(**values: Any) -> None:
        for name in ("learning_rate", "weight_decay", "ema_decay", "condition_dropout"):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite, got {value}.")
        if values["learning_rate"] <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {values['learning_rate']}.")
        if values["weight_decay"] < 0:
            raise ValueError(f"`weight_decay` must be non-negative, got {values['weight_decay']}.")
        if not 0.0 <= values["ema_decay"] < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {values['ema_decay']}; use 0 to disable averaging.")
        if not 0.0 <= values["condition_dropout"] <= 1.0:
            raise ValueError(f"`condition_dropout` must be a probability in [0, 1], got {values['condition_dropout']}.")
        minimum = {
            "warmup_steps": 0,
            "batch_size": 1,
            "num_workers": 0,
            "num_inference_steps": 1,
            "sample_batch_size": 1,
            "extraction_batch_size": 1,
        }
        for name, low in minimum.items():
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
            if value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value}.")

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        """Map images in [0, 1] to the denoiser's input space: [-1, 1] pixels, or scaled autoencoder latents."""
        if self.autoencoder is None:
            return images * 2.0 - 1.0
        expected = self.autoencoder.config.in_channels
        if images.shape[1] != expected:
            raise ValueError(
                f"`train_images` must have the autoencoder's {expected} channels, got shape {tuple(images.shape)}."
            )
        scaling = float(self.autoencoder.config.get("scaling_factor", 1.0))
        latents = []
        for batch in images.split(self.extraction_batch_size):
            pixels = batch * 2.0 - 1.0
            if isinstance(self.autoencoder, VQModel):
                latent = cast(Any, self.autoencoder).encode(pixels).latents
            else:
                # The posterior mean: deterministic, so the once-computed latents do not freeze one random draw.
                latent = self.autoencoder.encode(pixels).latent_dist.mean
            latents.append(latent * scaling)
        return torch.cat(latents)

    @staticmethod
    def _check_fit(unet: Any, inputs: Tensor) -> None:
        channels, size = unet.config.in_channels, unet.config.sample_size
        sizes = (size, size) if isinstance(size, int) else tuple(size)
        if inputs.shape[1] != channels or tuple(inputs.shape[2:]) != sizes:
            raise ValueError(
                f"the UNet expects inputs of shape (N, {channels}, {sizes[0]}, {sizes[1]}), but the training images"
                f" give {tuple(inputs.shape)}; resize the images to the UNet's sample_size (for a latent model, to the"
                " size the autoencoder maps to it)."
            )

    def _features(
        self,
        images: Tensor,
        feature: str | nn.Module | Callable[..., Tensor],
        train_features: Tensor | np.ndarray | None,
        cache_dir: str | os.PathLike | None,
    ) -> Tensor:
        if train_features is not None:
            if isinstance(train_features, np.ndarray):
                train_features = torch.from_numpy(train_features)
            if not isinstance(train_features, Tensor) or not train_features.is_floating_point():
                raise TypeError(
                    "`train_features` must be a floating tensor or array of shape (N, D), got"
                    f" {type(train_features).__name__}"
                    f"{f' of dtype {train_features.dtype}' if isinstance(train_features, Tensor) else ''}."
                )
            if train_features.ndim != 2 or train_features.shape[0] != images.shape[0]:
                raise ValueError(
                    f"`train_features` must have shape ({images.shape[0]}, D), one row per training image, got"
                    f" {tuple(train_features.shape)}."
                )
            features = train_features.detach().to("cpu", torch.float32)
        else:
            extractor = get_feature_extractor(feature)
            cache = FeatureCache(cache_dir) if cache_dir is not None else None
            key = FeatureCache.key(_CACHE_VERSION, self.data_fingerprint, extractor_fingerprint(extractor))
            features = cached(cache, key, lambda: self._extract(extractor, images)).to(torch.float32)
        if not bool(torch.isfinite(features).all()):
            raise ValueError("the training features must be finite, got NaN or infinite values.")
        if not bool(features.ne(0).any(dim=1).all()):
            raise ValueError(
                "every training feature vector must have a non-zero norm (DiADM divides by it), got all-zero rows;"
                " an all-black image gives zero pixel features, so remove it or use another extractor."
            )
        return features.contiguous()

    @torch.no_grad()
    def _extract(self, extractor: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        rows = [extractor(batch).detach().float().cpu() for batch in images.split(self.extraction_batch_size)]
        return torch.cat(rows)

    @property
    def num_train_images(self) -> int:
        """The number of training images."""
        return int(self.train_images.shape[0])

    @override
    def train_dataloader(self) -> DataLoader:
        """Batches of (denoiser inputs, image indices), shuffled."""
        dataset = TensorDataset(self._inputs, torch.arange(self.num_train_images))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=self._generators.get("data"),
        )

    @override
    def forward(self, sample: Tensor, timestep: Tensor, features: Tensor | None = None) -> Tensor:
        """Predict the scheduler's target for noisy `sample` at `timestep` with the trained (non-EMA) weights."""
        if self.conditional:
            return self.unet(sample, timestep, features, generator=self._generators.get("dropout")).sample
        return self.unet(sample, timestep).sample

    def loss(self, inputs: Tensor, indices: Tensor) -> Tensor:
        """The denoising loss of a batch of denoiser inputs (pixels in [-1, 1] or latents) and their image indices.

        Args:
            inputs: Clean denoiser inputs of shape (B, C, H, W).
            indices: int64 indices (B,) of the images in the training set, which select their feature vectors.

        Returns:
            The mean squared error between the prediction and the `prediction_type` target, in float32.
        """
        num_timesteps = self.scheduler.config.num_train_timesteps
        generator = self._generators.get("noise")
        if generator is None:
            noise = torch.randn_like(inputs)
            timesteps = torch.randint(0, num_timesteps, (inputs.shape[0],), device=inputs.device, dtype=torch.long)
        else:
            # Drawn on the CPU from the module's generator, so the stream is the same on every device.
            noise = torch.randn(inputs.shape, generator=generator).to(device=inputs.device, dtype=inputs.dtype)
            timesteps = torch.randint(0, num_timesteps, (inputs.shape[0],), generator=generator).to(inputs.device)
        noisy = self.scheduler.add_noise(inputs, noise, timesteps)
        features = self.feature_bank[indices] if self.feature_bank is not None else None
        prediction = self(noisy, timesteps, features)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = inputs
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(inputs, noise, timesteps)
        else:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        return F.mse_loss(prediction.float(), target.float())

    @override
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        inputs, indices = batch
        loss = self.loss(inputs, indices)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs.shape[0])
        return loss

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA weights towards the current ones: `ema <- d * ema + (1 - d) * weights`.

        `d = ema_decay_at(n, ema_decay)` with `n` the number of updates so far; buffers are copied. Called after
        every optimizer step (so once per `accumulate_grad_batches` batches).
        """
        decay = ema_decay_at(int(self.ema_num_updates), self.ema_decay)
        for average, current in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
            average.lerp_(current.detach().to(average.dtype), 1.0 - decay)
        for average, current in zip(self.ema_unet.buffers(), self.unet.buffers(), strict=True):
            average.copy_(current)
        self.ema_num_updates.add_(1)

    @override
    def on_fit_start(self) -> None:
        # The EMA copy never runs during fit (sampling switches it to eval mode), so its mode is only bookkeeping;
        # following the trained model keeps Lightning from warning about modules left in eval mode.
        self.ema_unet.train(self.unet.training)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_DATA_KEY] = self.data_fingerprint
        if self._generators:
            checkpoint[_RNG_KEY] = {name: generator.get_state() for name, generator in self._generators.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(_DATA_KEY)
        if stored is not None and stored != self.data_fingerprint:
            raise ValueError(
                "the checkpoint was trained on other images (data fingerprint"
                f" {stored[:12]}...) than this module's ({self.data_fingerprint[:12]}...); build the module with the"
                " same training images to resume."
            )
        states = checkpoint.get(_RNG_KEY)
        if states is not None and self._generators:
            for name, generator in self._generators.items():
                generator.set_state(states[name])

    def feature_indices(self, num_images: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw which bank feature conditions each of `num_images` samples: one per sample, without repeats.

        Indices are a random permutation of the training set (continued by further permutations when more samples
        than training images are asked for), so generating the training set's size uses every feature once.

        Args:
            num_images: The number of samples.
            generator: The random generator (on the CPU), or None for the global one.

        Returns:
            int64 indices of shape (num_images,).

        Raises:
            TypeError: If `num_images` is not an integer.
            ValueError: If `num_images` is below 1.
        """
        _check_num_images(num_images)
        rounds = -(-num_images // self.num_train_images)
        device = generator.device if generator is not None else torch.device("cpu")
        order = [torch.randperm(self.num_train_images, generator=generator, device=device) for _ in range(rounds)]
        return torch.cat(order)[:num_images].cpu()

    def pipeline(self) -> DiffusionPipeline:
        """A pipeline around the EMA weights: `DiADMPipeline` for DiADM, `DDPMPipeline`/`LDMPipeline` for the baseline.

        The pipeline shares the EMA model with this module (no copy), which it puts in eval mode, and gets a fresh
        copy of the sampling scheduler.
        """
        scheduler = type(self.sample_scheduler).from_config(self.sample_scheduler.config)
        # Sampling mode: FeatureConditionedUNet drops conditions in training mode.
        self.ema_unet.eval()
        if self.conditional:
            from diadm.pipelines.pipeline_diadm import DiADMPipeline

            return DiADMPipeline(
                unet=self.ema_unet, scheduler=scheduler, vqvae=self.autoencoder, feature_bank=self.feature_bank
            )
        if self.autoencoder is not None:
            return cast(DiffusionPipeline, LDMPipeline(vqvae=self.autoencoder, unet=self.ema_unet, scheduler=scheduler))
        return DDPMPipeline(unet=self.ema_unet, scheduler=scheduler)

    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        generator: torch.Generator | None = None,
        *,
        num_inference_steps: int | None = None,
        distinct_features: bool = True,
        progress: bool = False,
    ) -> Tensor:
        """Generate images with the EMA weights; DiADM conditions each sample on its own bank feature.

        Args:
            num_images: The number of images.
            generator: The random generator for the bank indices and the noise.
            num_inference_steps: Denoising steps; defaults to the module's `num_inference_steps`.
            distinct_features: DiADM only. True conditions the samples on distinct bank rows (`feature_indices`);
                False draws the rows independently and uniformly, with repeats.
            progress: Whether the pipeline draws its progress bar.

        Returns:
            float32 images in [0, 1] of shape (num_images, C, H, W), on the CPU.

        Raises:
            TypeError: If `num_images` is not an integer.
            ValueError: If `num_images` is below 1.
        """
        _check_num_images(num_images)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        was_training = self.ema_unet.training
        pipe: Any = self.pipeline()
        pipe.set_progress_bar_config(disable=not progress)
        indices = None
        if self.conditional and distinct_features:
            indices = self.feature_indices(num_images, generator)
        elif self.conditional:
            device = generator.device if generator is not None else torch.device("cpu")
            size = (num_images,)
            indices = torch.randint(self.num_train_images, size, generator=generator, device=device).cpu()
        chunks = []
        for start in range(0, num_images, self.sample_batch_size):
            count = min(self.sample_batch_size, num_images - start)
            kwargs: dict[str, Any] = {"batch_size": count, "generator": generator, "num_inference_steps": steps}
            if indices is not None:
                kwargs["feature_indices"] = indices[start : start + count]
            images = pipe(output_type="np", **kwargs).images
            chunks.append(torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2))
        self.ema_unet.train(was_training)
        return torch.cat(chunks).clamp(0.0, 1.0).contiguous()

    def save(self, directory: str | os.PathLike) -> Path:
        """Save `pipeline()` (EMA weights, sampling scheduler, feature bank) with `save_pretrained`.

        DiADM folders load with `DiADMPipeline.from_pretrained`, baseline folders with `DDPMPipeline` (or
        `LDMPipeline`) `.from_pretrained`.

        Args:
            directory: The folder to write.

        Returns:
            The folder, as a `Path`.
        """
        path = Path(directory)
        self.pipeline().save_pretrained(path)
        return path
