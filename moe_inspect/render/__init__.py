"""Terminal output: rich renderables built from the library's tables. Only the CLI calls these."""
