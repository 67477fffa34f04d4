"""The harness: CLI, scenario model, runner, ledger and results."""
