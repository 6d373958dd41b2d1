"""Analysis stage: what is computed from captured routing (token specialisation, and later compare/ablate)."""
