"""Public ops (DESIGN 1.4). Each takes ``impl="auto"|"triton"|"torch"``: the Triton kernel
(``fastmaskformer.kernels``) or the plain-PyTorch reference written from the formulas. Every op
taking ``pixel_embed`` accepts features shared by the predictions ``[B,C,h,w]`` or each
prediction's own ``[L,B,C,h,w]`` (EoMT)."""
from ._checks import final_pixel_embed
from .inference import (
    assemble_panoptic,
    instance_inference,
    panoptic_inference,
    semantic_inference,
    semantic_inference_tta,
)
from .mask_logits import mask_logits
from .mask_loss import mask_loss, mask_loss_assigned
from .matching_cost import matching_cost, matching_cost_packed, matching_cost_padded
from .assignment import linear_sum_assignment_batch
from .mask_probs import mask_probs
from .window_inference import window_semantic_inference
from .ms_deform_attn import MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference
