"""One module per ``preemptible`` subcommand."""
