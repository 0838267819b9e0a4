"""The terminal: messages and progress bars go to stderr, result tables to stdout.

Messages are soft-wrapped (the terminal wraps them), so a long path is never broken in two and can
be copied whole. Rich reads ``sys.stderr`` / ``sys.stdout`` at each print, so redirecting them
(tests, logging) works.
"""

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
"""Messages, warnings and progress bars (stderr)."""

results_console = Console()
"""Result tables (stdout), so that ``lorafit eval ... > results.txt`` keeps only the results."""
