"""Analyses over captured routing: accumulation, balance, route tables, info's counts, comparison, ablation,
placement, model outputs, token specialisation, ingested engine records, data-parallel reduction."""
