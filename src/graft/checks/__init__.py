"""Checks that need no weights, called by graft.validate (before a run loads anything) and by the commands
that read saved files: damaged weight files (files), prompt lengths against the model's context (prompts),
reward signatures, gate names and LoRA targets (calls), and a resumed run's config (resume)."""
