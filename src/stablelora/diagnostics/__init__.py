"""Per-layer stability diagnostics (StabilityMonitor) and the width-scaling check of the theory."""

from stablelora.diagnostics.monitor import StabilityMonitor

__all__ = ["StabilityMonitor"]
