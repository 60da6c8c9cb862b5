from .ms_deform_attn import (DeformableAttentionOutput, MSDeformAttn, UnprojectedValues,
                             multi_scale_deformable_attention, use_implementation)

__all__ = ["DeformableAttentionOutput", "MSDeformAttn", "UnprojectedValues", "multi_scale_deformable_attention",
           "use_implementation"]
