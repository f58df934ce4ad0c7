"""Reading a YAML file strictly: plain YAML keeps the last of two equal keys without a word, which
hides a config edit that never took effect; here that, like a syntax error, names the file and lines.
Writing one: ``dump_yaml``, the one way a run's config becomes YAML text (``config.yaml`` files)."""

from __future__ import annotations

from pathlib import Path

import yaml


class YamlError(ValueError):
    """The file is not valid YAML or gives a key twice; the message names the file and the lines."""


# Nodes a document may hold once its aliases are expanded. A run config has a few hundred; a few lines of
# nested aliases ("billion laughs") expand to billions, which would take minutes and gigabytes to walk.
MAX_NODES = 100_000


def read_yaml(path: str | Path):
    """The file's data (``None`` for an empty file); a syntax error, a repeated key or aliases that expand past
    ``MAX_NODES`` nodes raise ``YamlError``."""
    path = Path(path)
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: an alias is one shared node, not a copy
        if root is not None and _expanded_size(root, {}, set()) > MAX_NODES:
            raise YamlError(
                f"{path}: its aliases (*name) expand to more than {MAX_NODES:,} values (or refer to "
                "themselves); write the values out instead of nesting aliases"
            )
        if duplicate := _duplicate_key(root):
            raise YamlError(f"{path}: {duplicate}")
        return yaml.safe_load(text)
    except RecursionError:
        raise YamlError(f"{path}: nested too deeply to read (or an alias refers to itself)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlError(f"{path}:{where} is not valid YAML: {getattr(err, 'problem', None) or err}") from None


def dump_yaml(data) -> str:
    """``data`` as YAML text, keys in their given order (configs read back as they were written)."""
    return yaml.safe_dump(data, sort_keys=False)


def _expanded_size(node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded, counted once per distinct node (``sizes``
    memoises), so the count is fast however large it is. A node inside itself (``&a [*a]``) counts as too many."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_NODES + 1
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    return sizes[key]


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
