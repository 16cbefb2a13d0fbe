"""The network options of ``probe`` and ``train``, generated from NetSpec's fields.

Each NetSpec field carries a ``SpecOption`` in its metadata (help text, accepted values, option name, whether
the training data sets it); this module turns those into typer options, so adding a field to NetSpec with its
metadata adds the option to every command at once, and no command restates a name, a default or a help text.

Every network option is text (``--act relu,tanh``): the value is parsed, and comma lists expanded, by
``nets.expand_specs``, which names the option in its errors.
"""

import dataclasses
import functools
import inspect
from typing import Annotated

import typer

from steadygrad.nets import SpecOption, spec_cli_options

NETWORK_PARAMETER = "network"  # the parameter a decorated command declares to receive the options' raw text
COMMA_NOTE = "Comma-separated values compare several networks."


def _shown_default(field: dataclasses.Field, option: SpecOption) -> str:
    if option.shown_default:
        return option.shown_default
    if isinstance(field.default, bool):
        return "yes" if field.default else "no"
    if isinstance(field.default, float):
        return f"{field.default:g}"
    return str(field.default)


def option_help(field: dataclasses.Field, option: SpecOption, *, comma_lists: bool) -> str:
    """``help: choices. [default: ...]``, plus the comma-list note where the command compares networks."""
    text = option.help + (f": {', '.join(option.choices)}" if option.choices else "") + "."
    text += f" [default: {_shown_default(field, option)}]"
    return f"{text} {COMMA_NOTE}" if comma_lists else text


def network_options(*, comma_lists: bool, from_data: bool = False):
    """Give the decorated command one ``--OPTION`` per NetSpec field that has a SpecOption.

    The command declares a parameter named ``network``; the options take its place in the signature typer
    reads (so also in ``--help``), and the command receives ``network`` as a dict of option name -> raw text
    or None (left at NetSpec's default), ready for ``nets.expand_specs``.

    Args:
        comma_lists: say in the help that comma-separated values build several networks.
        from_data: also offer the sizes the training data sets (``SpecOption.from_data``); ``train`` takes
            them from its data, so it leaves this False.
    """

    def decorate(command):
        signature = inspect.signature(command)
        if NETWORK_PARAMETER not in signature.parameters:
            raise TypeError(f"{command.__name__} must declare a {NETWORK_PARAMETER!r} parameter to take the options.")
        generated = {}  # parameter name -> option name
        parameters = []
        for parameter in signature.parameters.values():
            if parameter.name != NETWORK_PARAMETER:
                parameters.append(parameter)
                continue
            for name, field, option in spec_cli_options():
                if option.from_data and not from_data:
                    continue
                identifier = f"net_{field.name}"  # never collides with the command's own parameters
                generated[identifier] = name
                help_text = option_help(field, option, comma_lists=comma_lists)
                parameters.append(
                    inspect.Parameter(
                        identifier,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=None,
                        annotation=Annotated[str | None, typer.Option(f"--{name}", help=help_text, show_default=False)],
                    )
                )
        clash = set(generated) & set(signature.parameters)
        if clash:
            raise TypeError(f"{command.__name__}'s parameters {sorted(clash)} clash with the network options.")

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            network = {generated[key]: kwargs.pop(key) for key in list(kwargs) if key in generated}
            return command(*args, **kwargs, **{NETWORK_PARAMETER: network})

        wrapper.__signature__ = signature.replace(parameters=_keyword_only_after_first(parameters))
        return wrapper

    return decorate


def _keyword_only_after_first(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """A valid signature order: once one parameter is keyword-only, every later one is too."""
    out, keyword_only = [], False
    for parameter in parameters:
        keyword_only = keyword_only or parameter.kind is inspect.Parameter.KEYWORD_ONLY
        out.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) if keyword_only else parameter)
    return out
