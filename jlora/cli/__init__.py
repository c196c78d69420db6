"""The console scripts: argument parsing, and `run.run_cli`, the one error-to-exit-code wrapper.

Each module is one entry point (pyproject.toml [project.scripts]); the work is done in the layers below.
"""
