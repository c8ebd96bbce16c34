"""Reports built from run directories only (never from training code)."""
