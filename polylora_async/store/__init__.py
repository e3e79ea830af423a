"""The adapter store: where adapter weights live, from their source to a GPU slot (the tiers)."""
