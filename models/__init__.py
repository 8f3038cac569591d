"""Model loading (``models.loader``), the image-only processor (``models.processor``) and the
tiny offline test model (``python -m models.tiny OUT_DIR``)."""
