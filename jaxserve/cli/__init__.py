"""The command line: absl flags derived from the config dataclasses, and how every command runs."""
