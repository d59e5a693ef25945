"""Weight converters: Hugging Face transformers MaskFormer -> fastmaskformer (``hf``)."""
from .hf import convert_hf_directory, from_hf, load_hf_pretrained, model_config_from_hf

__all__ = ["convert_hf_directory", "from_hf", "load_hf_pretrained", "model_config_from_hf"]
