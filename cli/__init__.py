"""The `dfkd` command line (installed as `dfkd.cli`)."""
