"""Per-user long-term memory: what people tell the bot about themselves comes back when it matters, and only then.

- :mod:`.facts`: the statements a message makes about its writer, as third-person notes (rules);
- :mod:`.model_facts`: the same asked of a capable model (``[memory] extract = "model"``);
- :mod:`.questions`: what a message asks of memory ("what do you know about me?", "forget that",
  "What is my cat called?");
- :mod:`.embedder`: sentence vectors for recall by meaning (all-MiniLM-L6-v2, checked, in the background);
- :mod:`.recall`: which notes are relevant to a message;
- :mod:`.keeper`: :class:`Memory`, the pipeline's one entry point.
"""

from agent_core.memory.facts import MAX_NOTE_CHARS
from agent_core.memory.keeper import Handled, Memory, Recalled, listing

__all__ = ["MAX_NOTE_CHARS", "Handled", "Memory", "Recalled", "listing"]
