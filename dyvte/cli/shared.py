"""The options the ``dyvte`` commands share: their checks, and the flat spellings ``fit`` takes for its nested ones.

``--samples``, ``--seed``, ``--image_folder``, ``--skip_bad_rows``, ``--prompt_template``, ``--device`` and ``--dtype``
mean the same on every command that has them (:data:`dyvte.cli.help.COMMON`, docs/guide.md "Command line").
``calibrate``, ``evaluate`` and ``report`` take them as plain options; ``fit`` nests its data options under
``--data.source.*`` and its device under ``--trainer.*``, and :func:`rewrite_aliases` turns the flat spellings into
those before LightningCLI parses them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dyvte.utils.checks import check_positive_int

__all__ = ["check_data_options", "option_values", "rewrite_aliases"]


def check_data_options(samples: int | None, seed: int, image_folder: str | None, samples_optional: bool = True) -> None:
    """Refuse a bad ``--samples``, ``--seed`` or ``--image_folder`` before any model is loaded (messages name them).

    Raises:
        ValueError: ``--samples`` not an int >= 1 (nor null when ``samples_optional``), ``--seed`` not an int, or an
            ``--image_folder`` that is not a folder.
    """
    check_positive_int("--samples", samples, optional=samples_optional)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--seed must be an int, got {seed!r}")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise ValueError(f"--image_folder {image_folder}: no such folder")


def _option(args: Sequence[str], i: int) -> tuple[str, str | None, int]:
    """``(name, value, index after it)`` of the option at ``args[i]`` (``--name=value`` or ``--name value``)."""
    name, eq, value = args[i].partition("=")
    if eq:
        return name, value, i + 1
    if i + 1 < len(args) and not args[i + 1].startswith("--"):
        return name, args[i + 1], i + 2
    return name, None, i + 1


def option_values(args: Sequence[str], names: Sequence[str]) -> dict[str, list[str | None]]:
    """The values given on the command line to each option of ``names`` (``None``: the option has no value)."""
    found: dict[str, list[str | None]] = {}
    for i, token in enumerate(args):
        if token.startswith("--"):
            name, value, _ = _option(args, i)
            if name in names:
                found.setdefault(name, []).append(value)
    return found


def rewrite_aliases(args: Sequence[str], aliases: Mapping[str, str], booleans: Sequence[str] = ()) -> list[str]:
    """``args`` with each flat spelling of ``aliases`` (``--image_folder``) renamed to its nested option
    (``--data.source.image_folder``), its value kept.

    Args:
        args: command-line arguments.
        aliases: flat option -> nested option.
        booleans: flat options whose values compare case-insensitively (``true`` = ``True``).

    Raises:
        ValueError: a flat option without a value, or an option given in both spellings with different values.
    """
    args = list(args)
    given = option_values(args, [*aliases, *aliases.values()])
    for flat, nested in aliases.items():
        if flat in given and None in given[flat]:
            raise ValueError(f"{flat} needs a value (it is {nested}), e.g. {flat} VALUE")
        values = {v.lower() if flat in booleans and v is not None else v for v in given.get(flat, [])}
        nested_values = {v.lower() if flat in booleans and v is not None else v for v in given.get(nested, [])}
        if values and nested_values and len(values | nested_values) > 1:
            raise ValueError(
                f"{flat} and {nested} are one option in two spellings, given different values "
                f"({', '.join(sorted(map(str, values)))} / {', '.join(sorted(map(str, nested_values)))}): give one"
            )
    out = []
    for token in args:
        name, eq, value = token.partition("=")
        out.append(aliases[name] + eq + value if name in aliases else token)
    return out
