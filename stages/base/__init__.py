"""The base layer: errors, names (contracts), settings, files and documents; imports nothing else of the project."""
