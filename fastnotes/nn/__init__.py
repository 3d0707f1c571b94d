"""Model-level building blocks: modules that own parameters and compose the ops (the ops themselves
live in fastnotes.<family>)."""
from .attention import RelPosSelfAttention, T5RelativeBias
from .global_pointer import GlobalPointer
from .lst import LadderMerge, LadderSideNetwork, fisher_importance

__all__ = ["GlobalPointer", "LadderMerge", "LadderSideNetwork", "RelPosSelfAttention", "T5RelativeBias", "fisher_importance"]
