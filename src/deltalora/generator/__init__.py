"""Prompt-to-LoRA generators: encoder, LoRA tokens, hyper-network, variant table, training, generation, retrieval."""
