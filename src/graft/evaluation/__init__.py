"""Evaluation: metrics on a task split (graft eval, and before / after training)."""

from graft.evaluation.core import (
    EvalResult,
    decode_completions,
    encode_messages,
    encode_prompts,
    evaluate,
)

__all__ = ["EvalResult", "decode_completions", "encode_messages", "encode_prompts", "evaluate"]
