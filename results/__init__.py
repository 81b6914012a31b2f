"""The likelihood tables of README.md, and the script that measures and renders them
(`python -m results.table`)."""
