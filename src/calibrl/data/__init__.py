"""Prompt sources: reasoning-gym procedural tasks and `datasets`-loaded files or hub ids.

Every source yields :class:`Example` rows and carries the verifier that scores an answer against
the reference. Train and held-out eval splits are drawn with their own seeds and never share a
question (any train row whose question text is in the eval split is dropped).
"""

from calibrl.data.prompts import PromptBuilder
from calibrl.data.example import Example
from calibrl.data.format import CompletionFormat
from calibrl.data.sources import SOURCES, DataSplits, build_splits

__all__ = ["SOURCES", "CompletionFormat", "DataSplits", "Example", "PromptBuilder", "build_splits"]
