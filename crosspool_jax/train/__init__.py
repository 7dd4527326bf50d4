"""Training tiny MoE models with optax on a local corpus, and trained fleets of fine-tunes."""
