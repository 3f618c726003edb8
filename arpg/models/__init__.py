"""Neural network modules (no training or sampling loops here)."""
