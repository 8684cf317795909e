"""``python -m agentspec.cli``: the ``agentspec`` command."""

from agentspec.cli import main

main()
