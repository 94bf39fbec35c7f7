# SPDX-License-Identifier: Apache-2.0
"""`DiADMPipeline`: sample a feature-conditioned UNet with any diffusers scheduler (SPEC.md section 3)."""

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import Tensor
from typing_extensions import override

from diadm.models.feature_conditioned_unet import FeatureConditionedUNet, _check_features

# The file, next to model_index.json, that holds the feature bank of a saved pipeline, under this tensor name.
FEATURE_BANK_FILE = "feature_bank.safetensors"
FEATURE_BANK_KEY = "feature_bank"
OUTPUT_TYPES = ("pil", "np", "pt")

OutputType = Literal["pil", "np", "pt"]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer, got {value!r} ({type(value).__name__}); pass at least 1."
        )


def _draw_indices(num_rows: int, batch_size: int, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Draw `batch_size` bank rows uniformly with replacement, one per sample, from `generator`."""
    if isinstance(generator, list):
        draws = [torch.randint(num_rows, (1,), generator=g, device=g.device).cpu() for g in generator]
        return torch.cat(draws)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(num_rows, (batch_size,), generator=generator, device=device).cpu()


class DiADMPipeline(DiffusionPipeline):
    """Sample images from a Diversity-Aware Diffusion Model: a `FeatureConditionedUNet` and any diffusers scheduler.

    Each image is conditioned on one feature vector. By default the vectors are drawn uniformly (with replacement,
    seeded by `generator`) from `feature_bank`, the features of the training images, so that the samples spread over
    the whole training set as DiADM intends (SPEC.md section 3). `feature_indices` picks bank rows, for instance the
    training images that the Image Retrieval Score shows the model never produces, and `features` steers sampling
    towards arbitrary target features. With a `vqvae` the UNet denoises latents that the autoencoder decodes, as in
    diffusers' `LDMPipeline`; without one it denoises pixels, as in `DDPMPipeline`.

    The feature bank is part of the saved pipeline: `save_pretrained` writes it to `feature_bank.safetensors` next to
    `model_index.json` (float32, shape (N_bank, feature_dim)), and `from_pretrained` reads it back.

    Args:
        unet: The feature-conditioned denoiser.
        scheduler: Any diffusers scheduler (DDPM, DDIM, DPM-Solver multistep and the others the unconditional
            pipelines accept).
        vqvae: For latent models, the autoencoder that decodes latents (`VQModel`, or `AutoencoderKL`); None for
            pixel-space models.
        feature_bank: Features of the training images, shape (N_bank, feature_dim), from the same extractor the model
            was trained with; raw extractor outputs (the model normalises them). Stored as float32 on the CPU.

    Raises:
        TypeError: If a component has the wrong type or `feature_bank` is not a floating tensor.
        ValueError: If `feature_bank` does not have shape (N_bank, feature_dim), holds non-finite values or zero rows.

    Note:
        `from_pretrained` reads the feature bank from a local directory only. For a pipeline on the Hugging Face Hub,
        download it first (`huggingface_hub.snapshot_download`) and pass the local path; any other path raises
        `NotImplementedError`, unless `feature_bank` is passed explicitly.

    Example:
        >>> import torch
        >>> from diffusers import DDIMScheduler, UNet2DModel
        >>> tiny = {"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8}
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> unet = FeatureConditionedUNet.from_unet(UNet2DModel(**tiny, **blocks), feature_dim=4)
        >>> pipeline = DiADMPipeline(unet, DDIMScheduler(), feature_bank=torch.randn(10, 4))
        >>> pipeline.set_progress_bar_config(disable=True)
        >>> output = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
        ...                   output_type="np")
        >>> output.images.shape
        (2, 8, 8, 3)
    """

    model_cpu_offload_seq = "unet->vqvae"  # type: ignore[assignment]  # diffusers annotates it as None
    _optional_components = ["vqvae"]  # noqa: RUF012  # a plain list, as DiffusionPipeline declares it

    def __init__(
        self,
        unet: FeatureConditionedUNet,
        scheduler: SchedulerMixin,
        vqvae: ModelMixin | None = None,
        feature_bank: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(unet, FeatureConditionedUNet):
            raise TypeError(
                f"`unet` must be a FeatureConditionedUNet, got {type(unet).__name__}; convert an unconditional"
                " UNet2DModel with `FeatureConditionedUNet.from_unet`, or sample it with diffusers' DDPMPipeline."
            )
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
        if vqvae is not None and not (isinstance(vqvae, ModelMixin) and hasattr(vqvae, "decode")):
            raise TypeError(
                "`vqvae` must be a diffusers autoencoder (VQModel or AutoencoderKL) or None, got"
                f" {type(vqvae).__name__}."
            )
        self.register_modules(unet=unet, scheduler=scheduler, vqvae=vqvae)
        self.feature_bank = feature_bank
        self.set_progress_bar_config(desc="DiADM sampling")

    @property
    def feature_bank(self) -> Tensor | None:
        """The training features sampled from, float32 on the CPU, shape (N_bank, feature_dim), or None.

        Assigning a new bank checks it as the constructor does.
        """
        return self._feature_bank

    @feature_bank.setter
    def feature_bank(self, feature_bank: Tensor | None) -> None:
        if feature_bank is not None:
            num_rows = feature_bank.shape[0] if isinstance(feature_bank, Tensor) and feature_bank.ndim == 2 else 1
            _check_features("feature_bank", feature_bank, self.unet.config["feature_dim"], max(num_rows, 1))
            feature_bank = feature_bank.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self._feature_bank = feature_bank

    @override
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save the components as `DiffusionPipeline.save_pretrained` does, and the feature bank next to them.

        Args:
            save_directory: The directory to write to; created if missing.
            *args: Passed on to `DiffusionPipeline.save_pretrained`.
            **kwargs: Passed on to `DiffusionPipeline.save_pretrained`.
        """
        os.makedirs(save_directory, exist_ok=True)
        bank_path = os.path.join(save_directory, FEATURE_BANK_FILE)
        # Written first, so that `push_to_hub=True` uploads it with the rest; a stale bank from an earlier save goes.
        if self.feature_bank is not None:
            save_file({FEATURE_BANK_KEY: self.feature_bank}, bank_path)
        elif os.path.exists(bank_path):
            os.remove(bank_path)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    @override
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DiADMPipeline":
        """Load a saved pipeline as `DiffusionPipeline.from_pretrained` does, with its feature bank.

        Args:
            pretrained_model_name_or_path: A local directory written by `save_pretrained`.
            **kwargs: Passed on to `DiffusionPipeline.from_pretrained`; an explicit `feature_bank` replaces the
                saved one.

        Returns:
            The pipeline; its `feature_bank` is None when none was saved.

        Raises:
            NotImplementedError: If the path is not a local directory and no `feature_bank` is passed.
        """
        if "feature_bank" not in kwargs:
            path = os.fspath(pretrained_model_name_or_path)
            if not os.path.isdir(path):
                raise NotImplementedError(
                    f"DiADMPipeline.from_pretrained reads the feature bank from a local directory, got {path!r},"
                    " which is not one. Download a Hub repository first with `huggingface_hub.snapshot_download`"
                    " and pass its local path, or pass `feature_bank=` explicitly."
                )
            bank_path = os.path.join(path, FEATURE_BANK_FILE)
            kwargs["feature_bank"] = load_file(bank_path)[FEATURE_BANK_KEY] if os.path.isfile(bank_path) else None
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def check_inputs(
        self,
        batch_size: int,
        features: Tensor | None,
        feature_indices: Sequence[int] | Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        eta: float = 0.0,
    ) -> None:
        """Check the arguments of `__call__` before any work is done; see there for what each must be.

        Raises:
            TypeError: As listed in `__call__`.
            ValueError: As listed in `__call__`.
        """
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
            raise TypeError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0, got {guidance_scale}; 1 means no guidance."
            )
        if guidance_scale != 1 and self.unet.config["condition_dropout"] == 0:
            raise ValueError(
                f"`guidance_scale` {guidance_scale} needs a model trained with condition dropout, so that its null"
                " (unconditional) embedding is trained, but this model has condition_dropout=0. Use"
                " guidance_scale=1, or train with condition_dropout > 0 (0.1 is common)."
            )
        if isinstance(eta, bool) or not isinstance(eta, int | float):
            raise TypeError(f"`eta` must be a number, got {type(eta).__name__}.")
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"`eta` must be a finite number >= 0, got {eta}; 0 is deterministic DDIM, 1 is DDPM-like.")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(item is None or isinstance(item, torch.Generator) for item in generators):
            found = type(generator).__name__ if not isinstance(generator, list) else "a list holding other objects"
            raise TypeError(
                f"`generator` must be a torch.Generator, a list of them or None, got {found}; seed one with"
                " `torch.Generator().manual_seed(seed)`."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` must be one generator or a list of `batch_size`={batch_size} generators, got a list of"
                f" {len(generator)}."
            )
        if features is not None and feature_indices is not None:
            raise ValueError("Pass `features` or `feature_indices`, not both.")
        if features is not None:
            _check_features("features", features, self.unet.config["feature_dim"], batch_size)
            return
        if self.feature_bank is None:
            raise ValueError(
                "This pipeline has no `feature_bank` to draw conditions from; pass `features` of shape"
                f" (batch_size, {self.unet.config['feature_dim']}), or build the pipeline with a `feature_bank`."
            )
        if feature_indices is None:
            return
        indices = torch.as_tensor(feature_indices)
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"`feature_indices` must be integers, got dtype {indices.dtype}.")
        num_rows = self.feature_bank.shape[0]
        if indices.ndim != 1 or indices.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`feature_indices` must be a sequence of 1 or `batch_size`={batch_size} bank rows, got shape"
                f" {tuple(indices.shape)}."
            )
        outside = indices[(indices < 0) | (indices >= num_rows)]
        if outside.numel() > 0:
            raise ValueError(
                f"`feature_indices` must lie in [0, {num_rows - 1}] (the feature bank has {num_rows} rows), got"
                f" {outside[:10].tolist()}."
            )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        features: Tensor | None = None,
        feature_indices: Sequence[int] | Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        """Generate `batch_size` images, each conditioned on one feature vector.

        Guidance follows the classifier-free convention of diffusers: the prediction is
        `uncond + guidance_scale * (cond - uncond)`, which is `cond + (guidance_scale - 1) * (cond - uncond)`; 1 uses
        the conditional prediction alone, 0 the unconditional (null-embedding) one, values above 1 push samples
        further towards their features. Any value other than 1 runs the UNet on a doubled batch.

        Args:
            batch_size: Number of images.
            features: Raw target features of shape (batch_size or 1, feature_dim); None draws bank rows.
            feature_indices: Bank rows to condition on, 1 or `batch_size` of them; None draws them.
            generator: Seeds, in this order, the initial noise, the bank draws and the scheduler's noise; a list
                gives one generator per image. A seeded call leaves the global random state untouched.
            num_inference_steps: Number of denoising steps.
            guidance_scale: Weight of the conditional prediction, see above. Needs a model trained with
                `condition_dropout` > 0 unless it is 1.
            output_type: "pil" (list of PIL images), "np" (float array (B, H, W, C) in [0, 1]) or "pt" (float tensor
                (B, C, H, W) in [0, 1], on the pipeline's device).
            return_dict: Whether to return an `ImagePipelineOutput` rather than a one-element tuple.
            eta: DDIM's eta, passed to schedulers whose `step` takes it.

        Returns:
            An `ImagePipelineOutput` whose `images` are in `output_type` format, or a tuple of them.

        Raises:
            TypeError: If `features` is not a floating tensor, `feature_indices` not integers, `guidance_scale` or
                `eta` not a number, or `generator` not a `torch.Generator`, a list of them or None.
            ValueError: If `batch_size` or `num_inference_steps` is not a positive integer, `output_type` is unknown,
                `guidance_scale` is negative or not finite or not 1 for a model without condition dropout, `eta` is
                negative or not finite, a list
                `generator` is not `batch_size` long, both `features` and `feature_indices` are given, `features` is
                malformed (width, rows, NaN), neither `features` nor a feature bank is there, or `feature_indices`
                has the wrong length or lies outside the bank.
        """
        # 0. Check inputs, before any work.
        self.check_inputs(
            batch_size, features, feature_indices, generator, num_inference_steps, guidance_scale, output_type, eta
        )
        device = self._execution_device
        unet_config = self.unet.unet.config

        # 1. Initial noise, seeded first so it does not depend on how the conditions are chosen.
        sample_size = unet_config.sample_size
        spatial = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        shape = (batch_size, unet_config.in_channels, *spatial)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        # 2. Conditions: given features, chosen bank rows, or bank rows drawn with the generator.
        if features is None:
            assert self.feature_bank is not None  # guaranteed by check_inputs
            if feature_indices is None:
                indices = _draw_indices(self.feature_bank.shape[0], batch_size, generator)
            else:
                indices = torch.as_tensor(feature_indices, dtype=torch.long).cpu()
            features = self.feature_bank[indices]

        # 3. Condition embeddings, computed once: (B, E), or (2B, E) with the null rows last when guiding.
        embedding = self.unet.condition_embedding(features.to(device), batch_size)
        guided = guidance_scale != 1
        if guided:
            embedding = torch.cat([embedding, self.unet.condition_embedding(None, batch_size)])

        # 4. Timesteps, and the optional arguments this scheduler's `step` takes.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta

        # 5. Denoising loop.
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, embedding=embedding).sample
            if guided:
                conditional, unconditional = prediction.chunk(2)
                # Guide the first `C` channels (the noise or sample prediction); a learned variance, in the
                # channels after them, is taken from the conditional prediction, as diffusers' guided pipelines do.
                channels = latents.shape[1]
                guided_part = unconditional[:, :channels] + guidance_scale * (
                    conditional[:, :channels] - unconditional[:, :channels]
                )
                prediction = torch.cat([guided_part, conditional[:, channels:]], dim=1)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

        # 6. Decode latents with the autoencoder, for latent models.
        if self.vqvae is not None:
            latents = latents / self.vqvae.config.scaling_factor
            latents = self.vqvae.decode(latents).sample

        # 7. From [-1, 1] to [0, 1], in the requested format.
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result: Any = images
        else:
            array: np.ndarray = images.cpu().permute(0, 2, 3, 1).float().numpy()
            result = self.numpy_to_pil(array) if output_type == "pil" else array

        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
