"""Speed and scale benchmarks (plain argparse scripts); a package so that import-linter checks their imports."""
