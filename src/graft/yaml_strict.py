"""YAML as graft reads recipes and overrides: PyYAML's safe types, with duplicate keys refused."""

from __future__ import annotations

from typing import Any

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last silently): a recipe that says `lr: 1e-4` and later `lr: 1e-2` is a mistake, not a choice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # merge keys (<<: *base) may be overridden: only explicit ones count
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, list | dict) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key].line + 1}); keep one of them",
                        key_node.start_mark,
                    )
                if not isinstance(key, list | dict):
                    seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str, name: str | None = None) -> Any:
    """YAML as graft reads it everywhere: safe types only, duplicate keys refused. `name`: the file, for
    the positions in error messages."""
    loader = UniqueKeyLoader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
