# SPDX-License-Identifier: Apache-2.0
"""Measure and fix the coverage of image generators.

`diadm` implements the Image Retrieval Score (IRS) and Diversity-Aware Diffusion Models (DiADM) from Dombrowski et
al., "Image Generation Diversity Issues and How to Tame Them", CVPR 2025 (arXiv:2411.16171).

Public objects are imported lazily, so `import diadm` does not pull in Lightning or diffusers until a class that
needs them is used.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS = {
    "IRSEstimate": "diadm.estimator",
    "estimate_irs": "diadm.estimator",
    "ExactIndex": "diadm.retrieval",
    "nearest_neighbors": "diadm.retrieval",
    "IRSResult": "diadm.functional",
    "image_retrieval_score": "diadm.functional",
    "ImageRetrievalScore": "diadm.metric",
    "IRSCallback": "diadm.callback",
    "FeatureConditionedUNet": "diadm.models.feature_conditioned_unet",
    "DiADMPipeline": "diadm.pipelines.pipeline_diadm",
    "DiADMModule": "diadm.training",
}

__all__ = [
    "DiADMModule",
    "DiADMPipeline",
    "ExactIndex",
    "FeatureConditionedUNet",
    "IRSCallback",
    "IRSEstimate",
    "IRSResult",
    "ImageRetrievalScore",
    "__version__",
    "estimate_irs",
    "image_retrieval_score",
    "nearest_neighbors",
]

if TYPE_CHECKING:
    from diadm.callback import IRSCallback
    from diadm.estimator import IRSEstimate, estimate_irs
    from diadm.functional import IRSResult, image_retrieval_score
    from diadm.metric import ImageRetrievalScore
    from diadm.models.feature_conditioned_unet import FeatureConditionedUNet
    from diadm.pipelines.pipeline_diadm import DiADMPipeline
    from diadm.retrieval import ExactIndex, nearest_neighbors
    from diadm.training import DiADMModule


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'diadm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
