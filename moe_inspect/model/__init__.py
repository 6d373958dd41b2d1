"""The model stage: where a checkpoint becomes a model in memory and its routers are read (source, options,
loading, families, routers, capture, quantization, footprint)."""
