"""`python -m dfkd` = the `dfkd` command."""

from dfkd.cli.main import main

main()
