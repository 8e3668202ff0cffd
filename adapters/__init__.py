"""Test-time training: a temporary LoRA adapter per prompt (built in a later issue)."""
