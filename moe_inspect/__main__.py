"""`python -m moe_inspect` (and `torchrun -m moe_inspect`) runs the command line."""

from moe_inspect.cli import main

if __name__ == "__main__":
    main()
