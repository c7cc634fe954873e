"""Built-in recipes, shipped inside the package as `uta_cli.recipes` (see pyproject.toml)."""
