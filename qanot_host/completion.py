"""Shell completion for `qanot-host`, made from its own argument parser (so it never lists a command
or an option the command does not have): bash natively, zsh through its bashcompinit."""

from __future__ import annotations

import argparse

__all__ = ["completion_script"]

# What an option's value completes to: files, or the option's own choices.
FILE_OPTIONS = ("--config", "--log-file")


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    commands = _subcommands(parser)
    top = " ".join([*commands, "--version", "--help"])
    cases = []
    for name, sub in commands.items():
        options = " ".join(option for action in sub._actions for option in action.option_strings)
        cases.append(f"        {name}) opts=\"{options}\" ;;")
    choices = []
    for sub in commands.values():
        for action in sub._actions:
            if action.choices and action.option_strings:
                words = " ".join(str(choice) for choice in action.choices)
                for option in action.option_strings:
                    choices.append(f"        {option}) COMPREPLY=($(compgen -W \"{words}\" -- \"$cur\")); return ;;")
    files = "|".join(FILE_OPTIONS)
    body = f"""_qanot_host() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} opts=""
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{top}" -- "$cur")); return
    fi
    case "$prev" in
        {files}) COMPREPLY=($(compgen -f -- "$cur")); return ;;
{chr(10).join(sorted(set(choices)))}
    esac
    case "${{COMP_WORDS[1]}}" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _qanot_host qanot-host"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
