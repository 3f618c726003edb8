"""One module per `arpg` subcommand: configure(parser) and run(args, params)."""
