"""Training: config dataclasses, the Trainer integration, and one run from config to run directory."""
