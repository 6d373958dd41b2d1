"""Analyses over accumulated routing: balance, placement, distributed reduction."""
