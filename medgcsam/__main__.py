"""`python -m medgcsam` (and `torchrun -m medgcsam`) run the CLI."""

from medgcsam.cli import app

app()
