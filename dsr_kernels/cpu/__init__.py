"""Python launchers of the compiled extension (csrc/): backend "cpu" of every op, and "cuda" of
norm_modulate and ttr_activation (one dispatcher op serves both devices)."""
