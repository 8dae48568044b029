"""Env files (configs/*.env): KEY=VALUE lines, the same names the trainer reads from the environment."""

from __future__ import annotations

from pathlib import Path


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments, blanks and a leading `export` skipped; quotes stripped); the values go through
    train_gpt.Config.from_env like the environment's."""
    env = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{i}: expected KEY=VALUE, got {line!r}")
        key, value = line.split("=", 1)
        env[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return env
