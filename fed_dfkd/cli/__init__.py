"""The ``fed-dfkd`` command: one module per subcommand; each parses and delegates."""
