"""Weight converters -> fastmaskformer: Hugging Face transformers MaskFormer, Mask2Former and
EoMT on DINOv2 and DINOv3 (``hf``, ``hf_mask2former``, ``hf_eomt``, ``hf_eomt_dinov3``; pieces they share: ``hf_common``), the official
Detectron2 MaskFormer / Mask2Former releases (``detectron2``) and the official EoMT releases
(``eomt``: DINOv2, and DINOv3's delta weights over a DINOv3 backbone file)."""
from .detectron2 import (
    convert_detectron2_file,
    detectron2_name_table,
    from_detectron2,
    load_detectron2_checkpoint,
)
from .eomt import (
    convert_eomt_file,
    eomt_dinov3_state_from_official,
    eomt_state_from_official,
    from_eomt_official,
    load_dinov3_backbone,
)
from .hf import convert_hf_directory, from_hf, load_hf_pretrained, model_config_from_hf

__all__ = [
    "convert_hf_directory", "from_hf", "load_hf_pretrained", "model_config_from_hf",
    "convert_detectron2_file", "detectron2_name_table", "from_detectron2", "load_detectron2_checkpoint",
    "convert_eomt_file", "eomt_state_from_official", "from_eomt_official", "eomt_dinov3_state_from_official",
    "load_dinov3_backbone",
]
