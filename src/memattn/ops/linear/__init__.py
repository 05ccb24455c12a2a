"""Linear attention (the approximate branch): kernel feature maps, four forms, constant-memory decoding.

Layout (B, S, H, D); state (kv (B, H, D_phi, Dv), z (B, H, D_phi)). See ``api.linear_attention``.
"""
from .api import FORMS, LinearAttentionState, linear_attention
from .feature_maps import FEATURE_MAPS, FavorFeatures
from .quality import favor_sweep, linear_attention_error

__all__ = ["linear_attention", "LinearAttentionState", "FavorFeatures", "FORMS", "FEATURE_MAPS",
           "favor_sweep", "linear_attention_error"]
