"""Stage contract, command-line plumbing, errors, settings and the names shared across stages."""
