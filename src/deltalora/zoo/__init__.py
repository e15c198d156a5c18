"""The reference LoRA zoo: PEFT adapter folders, LoRA training, the resumable build and its manifest."""
