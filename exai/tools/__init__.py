"""exai.tools."""
