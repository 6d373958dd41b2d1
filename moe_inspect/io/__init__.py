"""Formats, at the bottom with metrics: table schemas, atomic export, the corpus reader, token text and the
serving engines' routing records. Nothing here loads a model."""
