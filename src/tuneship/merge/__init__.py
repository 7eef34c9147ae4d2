"""Merge a LoRA adapter into its bf16 base and verify the logits."""

from tuneship.merge.merge import merge_adapter, verify_merge

__all__ = ["merge_adapter", "verify_merge"]
