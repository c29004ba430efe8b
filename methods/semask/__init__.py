"""SeMask-FPN: semantic layers inside a Swin backbone, a semantic-prior loss, Semantic-FPN head.

Example:
    >>> from methods.semask import SeMask, SeMaskKnobs
    >>> SeMask.name, SeMaskKnobs().prior_weight
    ('semask', 0.4)
"""

from __future__ import annotations

from methods.semask.backbone import (
    SemanticAttention,
    SemanticLayer,
    SeMaskSwin,
    build_semask_swin,
    load_pretrained,
    stage_attention,
)
from methods.semask.head import SemanticFPNHead, decode_priors
from methods.semask.method import SeMask, SeMaskFPN, SeMaskKnobs, ohem_weights, semask_loss

__all__ = [
    "SeMask",
    "SeMaskFPN",
    "SeMaskKnobs",
    "SeMaskSwin",
    "SemanticAttention",
    "SemanticFPNHead",
    "SemanticLayer",
    "build_semask_swin",
    "decode_priors",
    "load_pretrained",
    "ohem_weights",
    "semask_loss",
    "stage_attention",
]
