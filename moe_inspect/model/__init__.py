"""The model stage: where a checkpoint becomes a model in memory (source, loading, routers, families, capture,
quantization). Modules move here one at a time; the flat ones still live in ``moe_inspect/``."""
