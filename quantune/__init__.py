"""quantune: overdetermined-basis ("Kashin") quantization and LoRA repair for causal LMs."""
from quantune.config import FORMAT_VERSION, QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import quantize_model

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "QuantConfig", "QuantuneError", "QuantLinear", "quantize_model", "__version__"]
