"""The `spectrum` command line (above the Prefect flows): one subcommand per stage, plus pipeline, watch, runs, audit, report, demo."""
