"""graft: GRPO reinforcement fine-tuning for reasoning LLMs."""

__version__ = "0.1.0"
