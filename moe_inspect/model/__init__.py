"""Model stage: loading checkpoints, finding routers, family facts and capture."""
