"""YAML presets, shipped inside the package so `--config demo` works from any directory."""
