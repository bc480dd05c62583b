"""`python -m adag` (and `torchrun -m adag`): the `adag` command."""

from adag.cli import app

app(prog_name="adag")
