"""Training of the small default model (procedural shapes): data set, VAE, text encoder and transformer."""
