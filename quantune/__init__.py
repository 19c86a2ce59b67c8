"""quantune: overdetermined-basis ("Kashin") quantization and LoRA repair for causal LMs.

    import quantune
    model, tokenizer = quantune.load("out/smollm2-k4")      # a folder written by quantune
    # or, after `import quantune`, transformers' own loader works on it too:
    # AutoModelForCausalLM.from_pretrained("out/smollm2-k4")
"""
from quantune.config import FORMAT_VERSION, QuantConfig, QuantuneError
from quantune.qlinear import QuantLinear
from quantune.quantize import quantize_model
from quantune.serialization import load
import quantune.hf_integration  # noqa: E402,F401  (registers the "quantune" quantizer with transformers)

__version__ = "0.2.0"
__all__ = ["FORMAT_VERSION", "QuantConfig", "QuantuneError", "QuantLinear", "load", "quantize_model", "__version__"]
