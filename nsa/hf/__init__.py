"""nsa.hf: NSA language models in the Hugging Face transformers API (`pip install -e ".[hf]"`).

Importing it registers NSALMConfig, NSALMModel and NSALMForCausalLM with AutoConfig, AutoModel
and AutoModelForCausalLM under model_type "nsa_lm"; convert_from_dense turns a Llama / Qwen2 /
Mistral causal LM into an NSA one (docs/transformers.md).
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import NSALMCache
from .configuration import NSALMConfig
from .convert import convert_from_dense, from_trainer_checkpoint
from .modeling import NSALMForCausalLM, NSALMModel, NSALMPreTrainedModel

AutoConfig.register(NSALMConfig.model_type, NSALMConfig, exist_ok=True)
AutoModel.register(NSALMConfig, NSALMModel, exist_ok=True)
AutoModelForCausalLM.register(NSALMConfig, NSALMForCausalLM, exist_ok=True)

__all__ = ["NSALMCache", "NSALMConfig", "NSALMModel", "NSALMForCausalLM", "NSALMPreTrainedModel",
           "convert_from_dense", "from_trainer_checkpoint"]
