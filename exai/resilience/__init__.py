"""exai.resilience."""
