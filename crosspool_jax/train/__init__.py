"""Training tiny MoE models with optax on a local corpus."""
