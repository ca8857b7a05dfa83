"""exai.server."""
