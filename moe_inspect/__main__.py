"""`python -m moe_inspect` (and `torchrun ... -m moe_inspect`): the same CLI as the console script."""

from moe_inspect.cli import main

main()
