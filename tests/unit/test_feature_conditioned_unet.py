# SPDX-License-Identifier: Apache-2.0
"""Tests of `FeatureConditionedUNet` against the unconditional UNet it wraps and float64 formulas."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from diadm.models.feature_conditioned_unet import FeatureConditionedUNet, normalize_features

FEATURE_DIM = 12


def make_unet(**overrides: object) -> UNet2DModel:
    """A tiny random unconditional UNet2DModel (one attention block, so both block kinds are covered)."""
    config = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    }
    config.update(overrides)
    return UNet2DModel(**config).eval()


@pytest.fixture
def unet() -> UNet2DModel:
    return make_unet()


def randomize_condition(model: FeatureConditionedUNet) -> None:
    """Move the zero-initialised projection and null embedding away from zero, as training would."""
    with torch.no_grad():
        model.feature_projection.weight.normal_(0.0, 0.3)
        model.feature_projection.bias.normal_(0.0, 0.3)
        model.null_embedding.normal_(0.0, 0.3)


def with_bias_shift(unet: UNet2DModel, shift: torch.Tensor) -> UNet2DModel:
    """Independent reference: adding a constant to `emb` is adding it to the bias of the last timestep layer."""
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        reference.time_embedding.linear_2.bias += shift.to(reference.dtype)
    return reference


@pytest.mark.parametrize(
    "timestep", [0, 7, 500, 999, torch.tensor([3, 900])], ids=["t0", "t7", "t500", "t999", "per-sample"]
)
@pytest.mark.parametrize("with_features", [True, False], ids=["features", "null"])
def test_converted_model_equals_original_bit_for_bit(unet, timestep, with_features):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    sample = torch.randn(2, 3, 8, 8)
    features = torch.randn(2, FEATURE_DIM) if with_features else None
    with torch.no_grad():
        expected = unet(sample, timestep).sample
        actual = model(sample, timestep, features).sample
    assert torch.equal(actual, expected)


def test_conversion_copies_and_keeps_original(unet):
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.25)
    randomize_condition(model)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in before.items())
    assert unet.config.class_embed_type is None
    assert model.unet.config.class_embed_type == "identity"
    assert model.config.feature_dim == FEATURE_DIM
    assert model.config.condition_dropout == 0.25
    assert not model.training


def test_nonzero_projection_changes_output_and_depends_on_features(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    randomize_condition(model)
    sample = torch.randn(2, 3, 8, 8)
    features = torch.randn(2, FEATURE_DIM)
    with torch.no_grad():
        original = unet(sample, 50).sample
        conditioned = model(sample, 50, features).sample
        other = model(sample, 50, torch.randn(2, FEATURE_DIM)).sample
    assert (conditioned - original).abs().max() > 1e-3
    assert (conditioned - other).abs().max() > 1e-3


def test_condition_embedding_matches_float64_formula(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    randomize_condition(model)
    features = torch.randn(5, FEATURE_DIM) * 40.0 + 3.0
    x = features.double().numpy()
    weight = model.feature_projection.weight.detach().double().numpy()
    bias = model.feature_projection.bias.detach().double().numpy()
    # SPEC.md section 3: x / ||x||_2 * sqrt(D), then the linear projection.
    normalized = x / np.linalg.norm(x, axis=1, keepdims=True) * math.sqrt(FEATURE_DIM)
    expected = normalized @ weight.T + bias
    with torch.no_grad():
        actual = model.condition_embedding(features, batch_size=5).double().numpy()
    # float32 arithmetic on values of order 1: a few ulps of 1e-7 accumulate over 12 products.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(normalize_features(features).double().numpy(), normalized, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sqrt((normalized**2).mean(axis=1)), np.ones(5), atol=1e-12)


def test_features_enter_as_a_shift_of_the_timestep_embedding(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    randomize_condition(model)
    feature = torch.randn(1, FEATURE_DIM)
    shift = model.condition_embedding(feature, batch_size=1).detach()[0]
    reference = with_bias_shift(unet, shift)
    sample = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = reference(sample, 123).sample
        broadcast = model(sample, 123, feature).sample
        repeated = model(sample, 123, feature.repeat(3, 1) * 2.5).sample
    # (W x + b) + s against W x + (b + s): float32 reassociation only.
    torch.testing.assert_close(broadcast, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(repeated, broadcast, rtol=0, atol=1e-5)


def test_null_path_adds_the_null_embedding(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    randomize_condition(model)
    reference = with_bias_shift(unet, model.null_embedding.detach())
    sample = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = reference(sample, 40).sample
        null = model(sample, 40).sample
        conditioned = model(sample, 40, torch.randn(2, FEATURE_DIM)).sample
    torch.testing.assert_close(null, expected, rtol=0, atol=1e-5)
    assert (null - conditioned).abs().max() > 1e-3


def test_condition_dropout_fraction_in_training_mode_only():
    probability, batch = 0.3, 400
    unet = make_unet(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=probability)
    randomize_condition(model)
    sample = torch.randn(batch, 3, 8, 8)
    features = torch.randn(batch, FEATURE_DIM)
    with torch.no_grad():
        null = model(sample, 10).sample
        conditioned = model(sample, 10, features).sample
        model.train()
        trained = model(sample, 10, features).sample
    to_null = (trained - null).flatten(1).abs().amax(dim=1)
    to_conditioned = (trained - conditioned).flatten(1).abs().amax(dim=1)
    # Every row is one of the two paths, nothing in between.
    assert torch.all(torch.minimum(to_null, to_conditioned) < 1e-5)
    fraction = (to_null < to_conditioned).float().mean().item()
    # Binomial(400, 0.3): standard deviation 0.023; 4 standard deviations.
    assert abs(fraction - probability) < 4 * math.sqrt(probability * (1 - probability) / batch)
    assert torch.equal(conditioned, model.eval()(sample, 10, features).sample.detach())


def test_condition_dropout_draws_from_the_given_generator(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.5)
    randomize_condition(model)
    batch = 8
    sample, features = torch.randn(batch, 3, 8, 8), torch.randn(batch, FEATURE_DIM)
    dropped = torch.rand(batch, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < int(dropped.sum()) < batch
    with torch.no_grad():
        embedding = torch.where(
            dropped[:, None], model.condition_embedding(None, batch), model.condition_embedding(features, batch)
        )
        expected = model(sample, 4, embedding=embedding).sample
        model.train()
        state = torch.get_rng_state()
        actual = model(sample, 4, features, generator=torch.Generator().manual_seed(3)).sample
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_condition_dropout_one_always_uses_null(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=1.0)
    randomize_condition(model)
    sample = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        null = model(sample, 10).sample
        model.train()
        dropped = model(sample, 10, torch.randn(4, FEATURE_DIM)).sample
    torch.testing.assert_close(dropped, null, rtol=0, atol=1e-6)


def test_save_pretrained_round_trip(unet, tmp_path):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.2)
    randomize_condition(model)
    model.save_pretrained(tmp_path / "model")
    loaded = FeatureConditionedUNet.from_pretrained(tmp_path / "model")
    assert loaded.config.feature_dim == FEATURE_DIM
    assert loaded.config.condition_dropout == 0.2
    assert loaded.config.unet_config["block_out_channels"] == [8, 16]
    sample = torch.randn(2, 3, 8, 8)
    features = torch.randn(2, FEATURE_DIM)
    with torch.no_grad():
        for args in ((features,), ()):
            assert torch.equal(loaded(sample, 77, *args).sample, model(sample, 77, *args).sample)


def test_gradient_checkpointing_gives_the_same_gradients(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.0)
    randomize_condition(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    assert not model.is_gradient_checkpointing
    sample = torch.randn(2, 3, 8, 8)
    features = torch.randn(2, FEATURE_DIM)
    grads = []
    for module in (model, checkpointed):
        module.train()
        module.zero_grad()
        module(sample, 300, features).sample.square().mean().backward()
        grads.append({name: param.grad.clone() for name, param in module.named_parameters() if param.grad is not None})
    # Everything but the null embedding, which the conditional path does not use.
    assert len(grads[0]) == len(list(model.parameters())) - 1
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["feature_projection.weight"].abs().max() > 0


def test_zero_initialised_projection_still_learns(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.0).train()
    model(torch.randn(2, 3, 8, 8), 5, torch.randn(2, FEATURE_DIM)).sample.square().mean().backward()
    assert model.feature_projection.weight.grad.abs().max() > 0
    assert model.null_embedding.grad is None


@pytest.mark.parametrize(
    ("features", "error", "message"),
    [
        ([[0.0] * FEATURE_DIM], TypeError, "`features` must be a torch.Tensor of shape (batch, 12) or None, got list"),
        (torch.ones(2, FEATURE_DIM, dtype=torch.int64), TypeError, "`features` must be a floating tensor, got dtype"),
        (
            torch.ones(2, 5),
            ValueError,
            "`features` must have shape (batch, feature_dim) with feature_dim=12, got shape (2, 5)",
        ),
        (torch.ones(FEATURE_DIM), ValueError, "with feature_dim=12, got shape (12,)"),
        (torch.ones(3, FEATURE_DIM), ValueError, "must have 1 row (shared by every sample) or 2 rows"),
        (
            torch.tensor([[1.0] * FEATURE_DIM, [float("nan")] * FEATURE_DIM]),
            ValueError,
            "`features` must be finite, got NaN or infinite values in rows [1]",
        ),
        (torch.zeros(2, FEATURE_DIM), ValueError, "rows must have a non-zero L2 norm"),
    ],
    ids=["list", "integer", "width", "one-dimensional", "batch", "nan", "zero-row"],
)
def test_bad_features_raise(unet, features, error, message):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    with pytest.raises(error, match=re.escape(message)):
        model(torch.randn(2, 3, 8, 8), 1, features)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_class_embeds": 10}, "`unet` must be unconditional, got a class-conditional UNet2DModel with"),
        ({"class_embed_type": "timestep"}, "{'class_embed_type': 'timestep', 'num_class_embeds': None}"),
    ],
    ids=["num-class-embeds", "timestep-class-embedding"],
)
def test_class_conditional_unet_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FeatureConditionedUNet.from_unet(make_unet(**overrides), feature_dim=FEATURE_DIM)


def test_bad_constructor_arguments_raise(unet):
    config = dict(unet.config)
    with pytest.raises(TypeError, match=re.escape("`unet` must be a diffusers UNet2DModel, got Linear")):
        FeatureConditionedUNet.from_unet(torch.nn.Linear(2, 2), feature_dim=FEATURE_DIM)
    with pytest.raises(TypeError, match=re.escape("`unet_config` must be a dict")):
        FeatureConditionedUNet(unet_config="config.json", feature_dim=FEATURE_DIM)
    with pytest.raises(TypeError, match=re.escape("`feature_dim` must be an integer, got True (bool)")):
        FeatureConditionedUNet(unet_config=config, feature_dim=True)
    with pytest.raises(ValueError, match=re.escape("`feature_dim` must be a positive integer, got 0")):
        FeatureConditionedUNet(unet_config=config, feature_dim=0)
    with pytest.raises(ValueError, match=re.escape("`condition_dropout` must be a probability in [0, 1], got 1.5")):
        FeatureConditionedUNet(unet_config=config, feature_dim=FEATURE_DIM, condition_dropout=1.5)
    with pytest.raises(ValueError, match=re.escape("`condition_dropout` must be a probability in [0, 1], got nan")):
        FeatureConditionedUNet(unet_config=config, feature_dim=FEATURE_DIM, condition_dropout=float("nan"))
    with pytest.raises(TypeError, match=re.escape("`condition_dropout` must be a number, got '0.1' (str).")):
        FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout="0.1")
    with pytest.raises(TypeError, match=re.escape("`condition_dropout` must be a number, got True (bool).")):
        FeatureConditionedUNet(unet_config=config, feature_dim=FEATURE_DIM, condition_dropout=True)
    with pytest.raises(ValueError, match=re.escape("`unet_config` must describe an unconditional UNet2DModel")):
        FeatureConditionedUNet(unet_config={**config, "num_class_embeds": 3}, feature_dim=FEATURE_DIM)


def test_precomputed_embedding_mixes_conditional_and_null_rows(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM, condition_dropout=0.5)
    randomize_condition(model)
    sample = torch.randn(2, 3, 8, 8)
    features = torch.randn(2, FEATURE_DIM)
    with torch.no_grad():
        mixed = torch.cat([model.condition_embedding(features[:1], 1), model.condition_embedding(None, 1)])
        expected = torch.cat([model(sample[:1], 9, features[:1]).sample, model(sample[1:], 9).sample])
        model.train()  # a precomputed embedding is used as it is, without condition dropout
        actual = model(sample, 9, embedding=mixed).sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_bad_precomputed_embedding_raises(unet):
    model = FeatureConditionedUNet.from_unet(unet, feature_dim=FEATURE_DIM)
    sample = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        ValueError, match=re.escape("`embedding` must have shape (2, 32) (batch, embedding width), got (1, 32)")
    ):
        model(sample, 1, embedding=torch.zeros(1, 32))
    with pytest.raises(ValueError, match=re.escape("Pass `features` or a precomputed `embedding`, not both.")):
        model(sample, 1, torch.ones(2, FEATURE_DIM), embedding=torch.zeros(2, 32))
