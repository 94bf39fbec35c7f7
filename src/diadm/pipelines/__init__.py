# SPDX-License-Identifier: Apache-2.0
"""Pipelines: sampling DiADM models with any diffusers scheduler."""

from diadm.pipelines.pipeline_diadm import DiADMPipeline

__all__ = ["DiADMPipeline"]
