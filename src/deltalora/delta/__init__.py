"""Delta Activations: probe sets, δ of every zoo checkpoint, and how well δ separates tasks and domains."""
