# SPDX-License-Identifier: Apache-2.0
"""Models: the feature-conditioned UNet wrapper."""
