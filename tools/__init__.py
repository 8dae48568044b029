"""pgolf command-line tools: thin commands over importable library modules."""
