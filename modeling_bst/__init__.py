"""Block-State Transformer for Hugging Face Transformers.

Importing the package registers `BSTConfig` and `BSTForCausalLM` with `AutoConfig` and `AutoModelForCausalLM`
(`model_type = "bst"`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_bst import BSTConfig
from .modeling_bst import BSTCache, BSTForCausalLM, BSTModel, BSTPreTrainedModel


__version__ = "0.7.4"

AutoConfig.register(BSTConfig.model_type, BSTConfig, exist_ok=True)
AutoModel.register(BSTConfig, BSTModel, exist_ok=True)
AutoModelForCausalLM.register(BSTConfig, BSTForCausalLM, exist_ok=True)
# save_pretrained then copies the (flat) configuration and modeling files next to the weights and writes `auto_map`,
# so the folder loads with `trust_remote_code=True` where this package is not installed.
BSTConfig.register_for_auto_class()
BSTModel.register_for_auto_class("AutoModel")
BSTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["BSTCache", "BSTConfig", "BSTForCausalLM", "BSTModel", "BSTPreTrainedModel"]
