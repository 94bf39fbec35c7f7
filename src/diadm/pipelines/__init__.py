# SPDX-License-Identifier: Apache-2.0
"""Pipelines: sampling DiADM models with any diffusers scheduler."""
