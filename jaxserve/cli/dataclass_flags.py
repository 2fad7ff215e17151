"""absl flags derived from a frozen config dataclass, so that each flag is defined once.

`define_flags(EngineConfig, "engine")` defines one flag per field: named as the field (or as
`rename` says), typed from its annotation (bool, int, float, str, `X | None`, `tuple[str, ...]`
and `tuple[int, ...]` as repeatable flags), with the field's default, and with the help of the
class docstring's `Attributes:` entry for that field (Google style; `a, b: text` documents both).
A field added to the dataclass becomes a flag with nothing else to change; its `Attributes:`
line is its help. The returned FlagGroup turns the parsed flags back into keyword arguments.
"""

import dataclasses
import inspect
import re
import sys
import types
import typing

from absl import flags

FLAGS = flags.FLAGS
GROUPS: list["FlagGroup"] = []  # every group defined, for naming a bad value by its flag

_ENTRY = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the `Attributes:` section of cls's docstring (one line)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, list[str]] = {}
    current: list[str] = []
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        match = _ENTRY.match(line)
        if match and (entry_indent is None or indent == entry_indent):
            entry_indent = indent
            current = [match.group(3)]
            for name in match.group(2).split(","):
                docs[name.strip()] = current  # the names of one entry share its text
        elif entry_indent is not None and indent > entry_indent:
            current.append(line.strip())
        else:
            break
    return {name: " ".join(" ".join(text).split()) for name, text in docs.items()}


def _flag_kind(annotation) -> tuple[type, bool]:
    """(element type, repeatable) of a field's annotation; `X | None` is X."""
    if isinstance(annotation, str):
        raise TypeError(f"string annotation {annotation!r}: use real types in config dataclasses")
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _flag_kind(rest[0])
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0], True
    return annotation, False


@dataclasses.dataclass(frozen=True)
class FlagGroup:
    """The flags of one config dataclass. Attributes:
      title: its heading in --help ("engine", "sampling", "server").
      config_class: the dataclass.
      flag_names: field name -> flag name, in field order.
    """

    title: str
    config_class: type
    flag_names: dict[str, str]

    def values(self, *, only_given: bool = False) -> dict:
        """Field name -> the flag's value (tuples for repeatable flags); only_given: only the
        flags given on the command line."""
        values = {}
        for field, name in self.flag_names.items():
            flag = FLAGS[name]
            if only_given and not flag.present:
                continue
            values[field] = tuple(flag.value) if isinstance(flag.value, list) else flag.value
        return values

    def build(self, **overrides):
        """config_class from the flags, `overrides` replacing some fields."""
        return self.config_class(**{**self.values(), **overrides})


def define_flags(config_class: type, title: str, *, exclude: tuple[str, ...] = (),
                 rename: dict[str, str] | None = None,
                 choices: dict[str, list[str]] | None = None) -> FlagGroup:
    """Defines a flag for each field of config_class but `exclude`. rename: field -> flag name;
    choices: field -> allowed strings (an enum flag). A command wanting another default calls
    FLAGS.set_default. TypeError names a field whose type has no flag type (exclude it).
    The flags count as the calling module's, as if it had defined them (absl's key flags)."""
    rename, choices = rename or {}, choices or {}
    module_name = sys._getframe(1).f_globals["__name__"]
    if module_name == "__main__":  # as absl names the main module
        module_name = sys.argv[0]
    kw = {"module_name": module_name}
    docs = attribute_docs(config_class)
    hints = typing.get_type_hints(config_class)
    names = {}
    for field in dataclasses.fields(config_class):
        if field.name in exclude or not field.init:
            continue
        name = rename.get(field.name, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        help_text = docs.get(field.name) or f"{config_class.__name__}.{field.name}."
        kind, repeatable = _flag_kind(hints[field.name])
        if repeatable:
            default = list(default or ())
            if kind is str:
                flags.DEFINE_multi_string(name, default, help_text, **kw)
            elif kind is int:
                flags.DEFINE_multi_integer(name, default, help_text, **kw)
            else:
                raise TypeError(f"{config_class.__name__}.{field.name}: no flag type for tuples "
                                f"of {kind!r}; exclude it in define_flags")
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text, **kw)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text, **kw)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text, **kw)
        elif kind is str and field.name in choices:
            flags.DEFINE_enum(name, default, choices[field.name], help_text, **kw)
        elif kind is str:
            flags.DEFINE_string(name, default, help_text, **kw)
        else:
            raise TypeError(f"{config_class.__name__}.{field.name}: no flag type for "
                            f"{hints[field.name]!r}; exclude it in define_flags")
        names[field.name] = name
    group = FlagGroup(title, config_class, names)
    GROUPS.append(group)
    return group


def name_flags(message: str) -> str:
    """`message` with each `Config.field` of a defined group written as its flag, `--flag`."""
    for group in GROUPS:
        cls = group.config_class.__name__
        if cls in message:
            message = re.sub(rf"\b{cls}\.(\w+)", lambda m: f"--{group.flag_names.get(m[1], m[1])}"
                             if m[1] in group.flag_names else m[0], message)
    return message
