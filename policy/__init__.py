"""policy: the DSA model (MLA + lightning indexer + sigmoid MoE) and its checkpoint format.

Knows nothing of RL. `Transformer(preset("tiny"))` builds a CPU-sized model;
`load_pretrained(dir)` reads a DeepSeek-V3.2 layout checkpoint.
"""

from .args import PRESETS, ModelArgs, preset
from .checkpoint import load_pretrained, save_pretrained
from .model import KVCache, ModelOutput, Transformer, freeze_all_but_indexer, indexer_parameters

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelArgs",
    "ModelOutput",
    "Transformer",
    "freeze_all_but_indexer",
    "indexer_parameters",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
