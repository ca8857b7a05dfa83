"""exai.storage."""
