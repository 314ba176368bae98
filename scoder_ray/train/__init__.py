"""Supervised fine-tuning on Ray Train + DeepSpeed ZeRO: the synthesizer, the SCoder model, LoRA warm-ups."""
