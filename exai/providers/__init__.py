"""exai.providers."""
