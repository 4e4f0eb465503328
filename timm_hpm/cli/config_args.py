"""Command-line options generated from a configuration dataclass's fields, so that an option is declared once (its
type, default, range check and help beside the field) and every command that takes it says the same.

A field has an option when its ``metadata`` names a ``flag``; the rest of the metadata is ``add_argument``'s
keywords (``help``, ``choices``, ``metavar``, ``action``, ``default``, ...) with two of its own: ``negated=True``
for a ``--no-...`` switch that turns a default-True field off, and ``action='boolean_optional'`` for a
``--x/--no-x`` pair. The rest is read from the field: its type (``int``, ``float``, ``str``; ``Optional[...]``;
a sequence of names takes one or more values, ``nargs='+'``; a string is taken as given), its default (a tuple
is shown as a list), ``bool`` a switch. The dest is argparse's, from the flag (``--apgd-iters``:
``args.apgd_iters``).

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MSAConfig)
    cfg = config_from_args(MSAConfig, parser.parse_args(), eps=parse_eps(args.eps, args.norm))

The configuration checks its values when made (a ValueError naming the field and its flag): the command line adds
no checks of its own beyond argparse's types and choices.
"""
import argparse
import collections.abc
import dataclasses
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['config_options', 'add_config_arguments', 'option_values', 'config_from_args']

_SEQUENCES = (list, tuple, collections.abc.Sequence)


def config_options(config_class, only: Optional[Sequence[str]] = None) -> List[dataclasses.Field]:
    """The fields of ``config_class`` that have a command-line option (their metadata names a ``flag``), in order;
    ``only``: just these fields (a name without an option is an error)."""
    fields = [f for f in dataclasses.fields(config_class) if 'flag' in f.metadata]
    if only is None:
        return fields
    missing = sorted(set(only) - {f.name for f in fields})
    if missing:
        raise ValueError(f'{config_class.__name__} has no command-line option for {missing}')
    return [f for f in fields if f.name in only]


def _value_type(hint) -> Tuple[Any, bool]:
    """A field's value type and whether it is a sequence of them (``Optional`` unwrapped)."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in _SEQUENCES:
        return typing.get_args(hint)[0], True
    return hint, False


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _argument(f: dataclasses.Field, hint) -> Tuple[str, Dict[str, Any]]:
    """The flag and ``add_argument`` keywords of one field."""
    kwargs = {k: v for k, v in f.metadata.items() if k not in ('flag', 'negated')}
    value_type, sequence = _value_type(hint)
    default = _field_default(f)
    if value_type is bool:
        if kwargs.get('action') == 'boolean_optional':
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:  # a switch: on when given (a default-False field), or off (``negated``, a default-True field)
            kwargs.setdefault('action', 'store_true')
        return f.metadata['flag'], kwargs
    if kwargs.get('action') != 'append' and sequence:
        kwargs.setdefault('nargs', '+')
    if value_type in (int, float) and 'type' not in kwargs:  # a string needs no conversion
        kwargs['type'] = value_type
    if not kwargs.get('required'):
        kwargs.setdefault('default', list(default) if sequence and default is not None else default)
    return f.metadata['flag'], kwargs


def add_config_arguments(parser, config_class, title: str = None, description: str = None,
                         only: Optional[Sequence[str]] = None):
    """Add an option to ``parser`` for each field of ``config_class`` with a ``flag`` (see the module; ``only``:
    just these fields), in the fields' order, into a new argument group when ``title`` is given; returns the group
    (or ``parser``), for a command's own options beside them. A flag the parser has already (an option two
    configurations share, e.g. ``--eps``) is added once: the first one stands."""
    group = parser.add_argument_group(title, description) if title else parser
    hints = typing.get_type_hints(config_class)
    for f in config_options(config_class, only):
        flag, kwargs = _argument(f, hints[f.name])
        try:
            group.add_argument(flag, **kwargs)
        except argparse.ArgumentError as error:
            if 'conflicting option string' not in str(error):
                raise
    return group


def _dest(flag: str) -> str:
    return flag.lstrip('-').replace('-', '_')


def option_values(config_class, args: argparse.Namespace, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """field name -> the value parsed for its option (those :func:`add_config_arguments` added; ``only``: just these
    fields): a ``negated`` switch inverted, a list as a tuple; an unset repeatable option is left out (its field
    keeps its default)."""
    values = {}
    for f in config_options(config_class, only):
        value = getattr(args, f.metadata.get('dest', _dest(f.metadata['flag'])))
        if f.metadata.get('negated'):
            value = not value
        elif value is None and f.metadata.get('action') == 'append':
            continue
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return values


def config_from_args(config_class, args: argparse.Namespace, **overrides):
    """``config_class`` made from parsed ``args`` (those :func:`add_config_arguments` added): each field with a
    flag takes its option's value (a ``negated`` switch inverted, a list as a tuple, an unset repeatable option its
    field's default), ``overrides`` (values the command computes, e.g. ``eps`` parsed from ``'8/255'``) win, and
    the fields without a flag keep their defaults. The configuration checks the values (a ValueError naming the
    field and its flag)."""
    values = {k: v for k, v in option_values(config_class, args).items() if k not in overrides}
    return config_class(**values, **overrides)
