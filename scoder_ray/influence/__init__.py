"""Influence estimation: optimizer-aware LoRA gradient features, random projection, similarity to the teacher."""
