"""Networks (backbones): map token ids or embeddings to logits. No noising or sampling logic here.

The contract every network follows is in `dlm.network.base`; open checkpoints (LLaDA, Dream, causal LMs) load
through `dlm.network.families.load_pretrained_network`.
"""

from dlm.network.base import Network
from dlm.network.config import ModelConfig
from dlm.network.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Network", "Transformer"]
