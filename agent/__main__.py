"""`python -m agent` runs the `fedsite` command line."""

from agent.cli import main

main()
