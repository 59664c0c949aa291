"""Add-ons built (and started) only when asked for: one module each."""
