"""Prompt-to-LoRA generators: encoder, LoRA tokens, the hyper-network, the variant table, training, generation, retrieval."""
