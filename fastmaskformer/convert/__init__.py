"""Weight converters -> fastmaskformer: Hugging Face transformers MaskFormer, Mask2Former and
EoMT (``hf``, ``hf_mask2former``, ``hf_eomt``; pieces they share: ``hf_common``), the official
Detectron2 MaskFormer / Mask2Former releases (``detectron2``) and the official EoMT release
(``eomt``)."""
from .detectron2 import (
    convert_detectron2_file,
    detectron2_name_table,
    from_detectron2,
    load_detectron2_checkpoint,
)
from .eomt import convert_eomt_file, eomt_state_from_official, from_eomt_official
from .hf import convert_hf_directory, from_hf, load_hf_pretrained, model_config_from_hf

__all__ = [
    "convert_hf_directory", "from_hf", "load_hf_pretrained", "model_config_from_hf",
    "convert_detectron2_file", "detectron2_name_table", "from_detectron2", "load_detectron2_checkpoint",
    "convert_eomt_file", "eomt_state_from_official", "from_eomt_official",
]
