"""Near-line "slow thinking": LLM-written contextual reasoning instructions (PAPER.md section 1).

For each (dataset, user, cutoff) a prompt is built from the user's behaviour before the target
(``prompt``), an LLM writes one short sentence (``llm``: SmolLM2-135M-Instruct in pure JAX, or
an OpenAI-compatible HTTP server), the sentence is embedded by the sentence encoder and stored
with its model version and timestamp (``store``: an embedded, crash-safe store). ``generate``
is the batch job; the model reads ``InstructionStore.lookup_embeddings`` (missing, stale and
fallback rows use the learned default instruction). See docs/instructions.md.
"""

from oxyjax.instructions.prompt import (PROMPT_VERSION, UserContext, build_messages, context_for_example,
                                        context_key, find_leaks, history_key, postprocess, sanitize_text)
from oxyjax.instructions.store import InstructionRecord, InstructionStore, needs_refresh, record_key

__all__ = [
    "PROMPT_VERSION",
    "UserContext",
    "build_messages",
    "context_for_example",
    "context_key",
    "find_leaks",
    "history_key",
    "postprocess",
    "sanitize_text",
    "InstructionRecord",
    "InstructionStore",
    "needs_refresh",
    "record_key",
]
