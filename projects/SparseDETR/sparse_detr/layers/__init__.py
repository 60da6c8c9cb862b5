from .ms_deform_attn import DeformableAttentionOutput, MSDeformAttn, multi_scale_deformable_attention, use_implementation

__all__ = ["DeformableAttentionOutput", "MSDeformAttn", "multi_scale_deformable_attention", "use_implementation"]
