"""Weight converters: Hugging Face transformers MaskFormer (``hf``) and the official Detectron2
MaskFormer release (``detectron2``) -> fastmaskformer."""
from .detectron2 import (
    convert_detectron2_file,
    detectron2_name_table,
    from_detectron2,
    load_detectron2_checkpoint,
)
from .hf import convert_hf_directory, from_hf, load_hf_pretrained, model_config_from_hf

__all__ = [
    "convert_hf_directory", "from_hf", "load_hf_pretrained", "model_config_from_hf",
    "convert_detectron2_file", "detectron2_name_table", "from_detectron2", "load_detectron2_checkpoint",
]
