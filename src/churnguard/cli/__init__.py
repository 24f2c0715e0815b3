"""The churnguard command line: one entry point, one subcommand per concern."""
