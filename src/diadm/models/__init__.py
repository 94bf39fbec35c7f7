# SPDX-License-Identifier: Apache-2.0
"""Models: the feature-conditioned UNet wrapper."""

from diadm.models.feature_conditioned_unet import FeatureConditionedUNet, normalize_features

__all__ = ["FeatureConditionedUNet", "normalize_features"]
