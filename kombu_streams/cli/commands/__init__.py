"""The commands of ``kombu-streams``, grouped by what they work on. Each ``cmd_*`` takes the
parsed arguments and a Broker (None for a command that needs no server) and returns the exit
code; ``kombu_streams.cli.parsing`` says which function runs for which command."""
