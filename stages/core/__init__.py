"""The stage framework: the stage contract (stage), its command line (cli),
publishing through the store (execution) and a stage in its own process (process)."""
