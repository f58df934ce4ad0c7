"""Reading a YAML file strictly: plain YAML keeps the last of two equal keys without a word, which
hides a config edit that never took effect; here that, like a syntax error, names the file and lines.
Writing one: ``dump_yaml``, the one way a run's config becomes YAML text (``config.yaml`` files)."""

from __future__ import annotations

from pathlib import Path

import yaml


class YamlError(ValueError):
    """The file is not valid YAML or gives a key twice; the message names the file and the lines."""


def read_yaml(path: str | Path):
    """The file's data (``None`` for an empty file); a syntax error or a repeated key raises ``YamlError``."""
    path = Path(path)
    text = path.read_text()
    try:
        if duplicate := _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader)):
            raise YamlError(f"{path}: {duplicate}")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlError(f"{path}:{where} is not valid YAML: {getattr(err, 'problem', None) or err}") from None


def dump_yaml(data) -> str:
    """``data`` as YAML text, keys in their given order (configs read back as they were written)."""
    return yaml.safe_dump(data, sort_keys=False)


def _duplicate_key(node, prefix: str = "") -> str | None:
    """The first key a YAML node tree gives twice in one mapping, with both lines (plain YAML keeps the last
    value silently), else None."""
    if isinstance(node, yaml.SequenceNode):
        return next((d for child in node.value if (d := _duplicate_key(child, prefix))), None)
    if not isinstance(node, yaml.MappingNode):
        return None
    seen = {}
    for key_node, value in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if isinstance(key_node, yaml.ScalarNode) and key != "<<":
            if key in seen:
                return f"key '{prefix}{key}' is given twice (line {seen[key]} and line {line}); keep one of them"
            seen[key] = line
        if found := _duplicate_key(value, f"{prefix}{key}."):
            return found
    return None
