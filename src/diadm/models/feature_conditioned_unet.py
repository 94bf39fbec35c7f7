# SPDX-License-Identifier: Apache-2.0
"""A diffusers `UNet2DModel` conditioned on the feature vector of a training image (DiADM, SPEC.md section 3)."""

import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from torch import Tensor, nn
from typing_extensions import override

# `UNet2DModel` config keys that make a model class-conditional; a wrapped model must leave them unset.
_CLASS_CONDITIONING_KEYS = ("class_embed_type", "num_class_embeds")


def normalize_features(features: Tensor) -> Tensor:
    """Divide every row by its L2 norm and scale it by `sqrt(D)`, so its elements have unit RMS (SPEC.md section 3).

    Args:
        features: Floating tensor of shape (N, D) with no zero rows.

    Returns:
        A float32 tensor of shape (N, D) whose rows have L2 norm `sqrt(D)`.

    Example:
        >>> import torch
        >>> normalize_features(torch.tensor([[3.0, 4.0]]))
        tensor([[0.8485, 1.1314]])
    """
    features = features.float()
    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return features / norms * math.sqrt(features.shape[1])


def _check_features(name: str, features: Any, feature_dim: int, batch_size: int) -> Tensor:
    """Check a (1 or batch_size, feature_dim) floating, finite tensor with non-zero rows, and return it.

    Args:
        name: The argument name, for the messages.
        features: What the caller passed.
        feature_dim: The width the model was built for.
        batch_size: The number of samples; one feature row is broadcast to all of them.

    Returns:
        `features`, unchanged.

    Raises:
        TypeError: If `features` is not a floating `torch.Tensor`.
        ValueError: If its shape is not (batch_size or 1, feature_dim), or it holds non-finite values or zero rows.
    """
    if not isinstance(features, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape (batch, {feature_dim}) or None, got {type(features).__name__}."
        )
    if not features.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got dtype {features.dtype}; convert it with `.float()`.")
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(
            f"`{name}` must have shape (batch, feature_dim) with feature_dim={feature_dim}, got shape"
            f" {tuple(features.shape)}; pass one feature vector per image from the extractor the model was built for."
        )
    if features.shape[0] not in (1, batch_size):
        raise ValueError(
            f"`{name}` must have 1 row (shared by every sample) or {batch_size} rows (one per sample), got"
            f" {features.shape[0]} rows; match the batch size of `sample`."
        )
    finite = torch.isfinite(features)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite.all(dim=1)).flatten().tolist()
        raise ValueError(f"`{name}` must be finite, got NaN or infinite values in rows {rows[:10]}.")
    zero_rows = torch.nonzero(~features.ne(0).any(dim=1)).flatten().tolist()
    if zero_rows:
        raise ValueError(
            f"`{name}` rows must have a non-zero L2 norm (each row is divided by it), got all-zero rows"
            f" {zero_rows[:10]}."
        )
    return features


class FeatureConditionedUNet(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own bases disagree
    """A `UNet2DModel` whose timestep embedding receives a linear projection of a feature vector (DiADM).

    Each feature vector (for example the Inception or SwAV features of a training image) is divided by its L2 norm and
    scaled by `sqrt(feature_dim)`, projected by a linear layer to the UNet's timestep-embedding width, and added to the
    timestep embedding exactly where a class embedding would go (the wrapped UNet runs with
    `class_embed_type="identity"`, and the projection is passed in as its `class_labels`). Callers pass raw extractor
    outputs. `features=None` selects the unconditional path: a learned null embedding takes the projection's place.
    In training mode, each sample's condition is replaced by the null embedding with probability
    `condition_dropout`, which trains the null path and makes guidance between the two possible.

    The projection and the null embedding start at zero, so a model converted with `from_unet` computes exactly what
    the original unconditional model computes, bit for bit, until training moves them. Works for pixel-space UNets
    and for the `UNet2DModel` inside an unconditional latent diffusion pipeline (`LDMPipeline`) alike.

    Args:
        unet_config: The config of the wrapped `UNet2DModel` (as in `dict(unet.config)`). It must not be
            class-conditional: `class_embed_type` must be None or "identity" and `num_class_embeds` None.
        feature_dim: The width `D` of the feature vectors.
        condition_dropout: Probability in [0, 1] of replacing a sample's condition by the null embedding in training.

    Raises:
        TypeError: If `unet_config` is not a mapping, `feature_dim` is not an integer or `condition_dropout` not a
            number.
        ValueError: If `unet_config` is class-conditional, `feature_dim` is not positive, or `condition_dropout` is
            outside [0, 1].

    Example:
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> tiny = {"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8}
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> unet = UNet2DModel(**tiny, **blocks)
        >>> model = FeatureConditionedUNet.from_unet(unet, feature_dim=16)
        >>> sample = torch.randn(2, 3, 8, 8)
        >>> features = torch.randn(2, 16)
        >>> with torch.no_grad():
        ...     torch.equal(model(sample, 10, features).sample, unet(sample, 10).sample)
        True
        >>> model.num_parameters() - unet.num_parameters()  # projection 16 x 32 + bias 32 + null embedding 32
        576
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict[str, Any], feature_dim: int, condition_dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(unet_config, dict):
            raise TypeError(
                f"`unet_config` must be a dict (for example `dict(unet.config)`), got {type(unet_config).__name__}."
            )
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
            raise TypeError(f"`feature_dim` must be an integer, got {feature_dim!r} ({type(feature_dim).__name__}).")
        if feature_dim < 1:
            raise ValueError(f"`feature_dim` must be a positive integer, got {feature_dim}.")
        if isinstance(condition_dropout, bool) or not isinstance(condition_dropout, int | float):
            raise TypeError(
                f"`condition_dropout` must be a number, got {condition_dropout!r} ({type(condition_dropout).__name__})."
            )
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"`condition_dropout` must be a probability in [0, 1], got {condition_dropout!r}.")
        if unet_config.get("num_class_embeds") is not None or unet_config.get("class_embed_type") not in (
            None,
            "identity",
        ):
            found = {key: unet_config.get(key) for key in _CLASS_CONDITIONING_KEYS}
            raise ValueError(
                "`unet_config` must describe an unconditional UNet2DModel (class_embed_type None and"
                f" num_class_embeds None), got {found}; the feature projection takes the class-embedding slot."
            )
        inner_config = {key: value for key, value in unet_config.items() if not key.startswith("_")}
        inner_config["class_embed_type"] = "identity"
        self.unet = UNet2DModel.from_config(inner_config)
        # The width of `emb` in UNet2DModel.forward, which the class embedding is added to.
        embedding_dim = self.unet.time_embedding.linear_2.out_features
        self.feature_projection = nn.Linear(feature_dim, embedding_dim)
        self.null_embedding = nn.Parameter(torch.zeros(embedding_dim))
        nn.init.zeros_(self.feature_projection.weight)
        nn.init.zeros_(self.feature_projection.bias)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, feature_dim: int, condition_dropout: float = 0.1) -> "FeatureConditionedUNet":
        """Convert an unconditional `UNet2DModel` into a feature-conditioned one that computes the same outputs.

        The weights are copied (the given `unet` is left untouched), and the new projection and null embedding start
        at zero, so `model(sample, t, features).sample` equals `unet(sample, t).sample` bit for bit.

        Args:
            unet: An unconditional `UNet2DModel`, pixel-space or the denoiser of a latent diffusion pipeline.
            feature_dim: The width `D` of the feature vectors.
            condition_dropout: Probability of replacing a sample's condition by the null embedding in training.

        Returns:
            The converted model, on the device and in the dtype of `unet`, in the training mode of `unet`.

        Raises:
            TypeError: If `unet` is not a `UNet2DModel`.
            ValueError: If `unet` is already class-conditional, or as the constructor does.
        """
        if not isinstance(unet, UNet2DModel):
            raise TypeError(
                f"`unet` must be a diffusers UNet2DModel, got {type(unet).__name__}; text- or class-conditional"
                " UNets are not supported."
            )
        found = {key: unet.config.get(key) for key in _CLASS_CONDITIONING_KEYS}
        if any(value is not None for value in found.values()):
            raise ValueError(
                f"`unet` must be unconditional, got a class-conditional UNet2DModel with {found}; the feature"
                " projection takes the class-embedding slot. Start from an unconditional model."
            )
        model = cls(unet_config=dict(unet.config), feature_dim=feature_dim, condition_dropout=condition_dropout)
        # An identity class embedding has no parameters, so the state dicts match key for key.
        model.unet.load_state_dict(unet.state_dict())
        # nn.Module.to, not ModelMixin.to: the latter warns about float32-only modules whenever a dtype is passed.
        nn.Module.to(model, device=unet.device, dtype=unet.dtype)
        model.train(unet.training)
        return model

    def condition_embedding(self, features: Tensor | None, batch_size: int) -> Tensor:
        """Return the embedding that is added to the timestep embedding, without condition dropout.

        Args:
            features: Raw feature vectors of shape (batch_size or 1, feature_dim), or None for the null embedding.
            batch_size: The number of samples.

        Returns:
            A tensor of shape (batch_size, embedding width), in the model's dtype.

        Raises:
            TypeError: If `features` is not a floating tensor.
            ValueError: If `features` has the wrong shape, non-finite values or all-zero rows.
        """
        if features is None:
            return self.null_embedding[None].expand(batch_size, -1)
        _check_features("features", features, self.config["feature_dim"], batch_size)
        weight = self.feature_projection.weight
        normalized = normalize_features(features.to(weight.device)).to(weight.dtype)
        return self.feature_projection(normalized).expand(batch_size, -1)

    @override
    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        features: Tensor | None = None,
        return_dict: bool = True,
        *,
        embedding: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> UNet2DOutput | tuple:
        """Predict with the wrapped UNet, conditioned on `features`.

        Args:
            sample: Noisy input of shape (batch, channels, height, width).
            timestep: The timestep, a scalar or one per sample.
            features: Raw feature vectors of shape (batch or 1, feature_dim); None selects the unconditional path.
            return_dict: Whether to return a `UNet2DOutput` rather than a one-element tuple.
            embedding: A precomputed `condition_embedding` of shape (batch, embedding width), used as it is (no
                condition dropout) instead of `features`. Samplers compute it once rather than at every step, and
                can mix conditional and null rows in one batch.
            generator: Draws the condition-dropout decisions in training mode (on its device, then moved to the
                model's); None uses the global generator.

        Returns:
            A `UNet2DOutput` (or tuple) holding the prediction of the wrapped UNet, shaped like `sample`.

        Raises:
            TypeError: If `features` is not a floating tensor.
            ValueError: If `features` has the wrong shape, non-finite values or all-zero rows, if `embedding` does
                not have shape (batch, embedding width), or if both `features` and `embedding` are given.
        """
        batch_size = sample.shape[0]
        if embedding is not None:
            if features is not None:
                raise ValueError("Pass `features` or a precomputed `embedding`, not both.")
            expected = (batch_size, self.null_embedding.shape[0])
            if tuple(embedding.shape) != expected:
                raise ValueError(
                    f"`embedding` must have shape {expected} (batch, embedding width), got {tuple(embedding.shape)};"
                    " compute it with `condition_embedding(features, batch_size)`."
                )
            return self.unet(sample, timestep, class_labels=embedding, return_dict=return_dict)
        embedding = self.condition_embedding(features, batch_size)
        probability = float(self.config["condition_dropout"])
        if self.training and features is not None and probability > 0.0:
            device = generator.device if generator is not None else embedding.device
            dropped = torch.rand(batch_size, generator=generator, device=device).to(embedding.device) < probability
            null = self.null_embedding.to(embedding.dtype)[None].expand_as(embedding)
            embedding = torch.where(dropped[:, None], null, embedding)
        return self.unet(sample, timestep, class_labels=embedding, return_dict=return_dict)
