"""The command line's settings, parsed by transformers' `HfArgumentParser`: every field of TRL's `SFTConfig` as the
library declares it, and of peft's `LoraConfig`, the `BitsAndBytesConfig` arguments and the project's settings
through dataclasses generated from those classes (no field is copied by hand). Names never overlap, so each is a flag
of its own name: `--learning_rate 1e-4 --r 8 --use_dora true --report_to wandb --math_samples 2000`.

Defaults come from the profile (or a saved config), so a flag changes only what it names.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field

from llmhelpers.config.profiles import make_config, profile_names
from llmhelpers.config.library import BNB_ARGUMENTS, bnb_arguments, jsonable, non_default_fields
from llmhelpers.config.project import PROJECT_FIELDS, FinetuneConfig


@dataclass
class RunArguments:
    profile: str = field(default="full", metadata={"help": "configs/<profile>.yaml: full (the real model, needs a "
                                                           "GPU), smoke (tiny model, any CPU, a minute), seed (the "
                                                           "original plan, for comparison), or a file you add"})
    config: str | None = field(default=None, metadata={"help": "a saved config (FinetuneConfig.save, e.g. a run's "
                                                               "finetune_config.json) to start from instead"})
    fresh: bool = field(default=False, metadata={"help": "start over: move this run's folder aside first"})
    allow_fresh_optimizer: bool = field(default=False, metadata={
        "help": "resume a checkpoint whose optimizer/scheduler state is missing (restarts the warm-up)"})
    evaluate: bool = field(default=False, metadata={"help": "grade base vs fine-tuned answers afterwards"})


def _simple(hint):
    """The argparse-able type of a field (str/int/float/bool, optionally None), or None if it has none. A list of
    strings is read as one comma-separated string."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    if hint in (str, int, float, bool):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = {_simple(a) for a in args}
        if kinds <= {str, None} and str in kinds or any(typing.get_origin(a) is list for a in args):
            return str | None if optional else str
        if len(args) == 1 and args[0] in (str, int, float, bool):
            return args[0] | None
    if typing.get_origin(hint) is list and typing.get_args(hint) in ((str,),):
        return str
    if typing.get_origin(hint) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(hint)):
        return str
    return None


def field_comments(cls) -> dict[str, str]:
    """The comment of each field in a dataclass's source: the one after it (`name: type = default  # why`), else the
    comment lines right above it. The project's settings are documented there, nanoGPT-style, and --help shows the
    same words."""
    import inspect

    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("# ---"):  # a section's title, not a field's comment
            above = []
        elif text.startswith("#") and line.startswith("    #"):
            above.append(text.lstrip("# ").strip())
        elif line.startswith("    ") and not line.startswith("     ") and ":" in text and not text.startswith(("def ", "@")):
            name, _, rest = text.partition(":")
            if name.isidentifier():
                after = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
                if after or above:
                    comments[name] = after or " ".join(above)
            above = []
        elif not text:
            above = []
    return comments


def _generated(name: str, source, names=None, exclude=(), init_arguments: bool = False) -> type:
    """A dataclass of `source`'s parseable fields (of a dataclass, or a class's __init__ arguments), defaults as
    there."""
    out = []
    if not init_arguments:
        hints = typing.get_type_hints(source)
        comments = field_comments(source) if source is FinetuneConfig else {}
        for f in dataclasses.fields(source):
            kind = _simple(hints.get(f.name))
            if not f.init or f.name.startswith("_") or kind is None or f.name in exclude or (names and f.name not in names):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is not None and not isinstance(default, (str, int, float, bool)):
                default = None
            words = ((f.metadata or {}).get("help") or comments.get(f.name, "")).replace("%", "%%")
            out.append((f.name, kind, field(default=default, metadata={"help": words})))
    else:
        import inspect

        for p in inspect.signature(source.__init__).parameters.values():
            if p.name in (names or ()):
                kind = {bool: bool, float: float}.get(type(p.default), str | None)
                default = p.default if isinstance(p.default, (str, int, float, bool)) else None
                out.append((p.name, kind, field(default=default, metadata={"help": "BitsAndBytesConfig argument"})))
    return dataclasses.make_dataclass(name, out)


def parser_classes():
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    project = _generated("ProjectArguments", FinetuneConfig, names=PROJECT_FIELDS - {"profile"})
    lora = _generated("LoraArguments", LoraConfig, exclude=("task_type", "base_model_name_or_path", "revision",
                                                             "inference_mode", "peft_type", "auto_mapping"))
    bnb = _generated("BnbArguments", BitsAndBytesConfig, names=BNB_ARGUMENTS, init_arguments=True)
    return RunArguments, project, lora, bnb, SFTConfig


def build_parser(prog: str = "llmhelpers", description: str | None = None):
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(parser_classes(), prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: _fail(prog, message)  # one line, not the usage of some 250 flags
    for action in parser._actions:  # the value this profile or config gives, which parse() sets as the default
        if action.dest != "help" and "%(default)" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
    parser.allow_abbrev = False  # --learning_rat is a typo, not --learning_rate
    return parser


def _negative_values_attached(argv: list[str]) -> list[str]:
    """`--flag -1e-4` as `--flag=-1e-4`: argparse takes a value like -1e-4 (not a plain -1 or -0.5) for a flag and
    says "expected one argument", where the value's own check has the useful message."""
    import re

    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if (token.startswith("--") and "=" not in token and i + 1 < len(argv)
                and re.fullmatch(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", argv[i + 1], re.IGNORECASE)):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def parse(argv: list[str] | None, prog: str = "llmhelpers", description: str | None = None):
    """(RunArguments, FinetuneConfig) from the command line; a bad flag or value exits with a message (code 2)."""
    import argparse

    argv = _negative_values_attached(sys.argv[1:] if argv is None else list(argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", default="full")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(prog, description)
    try:
        base = FinetuneConfig.load(known.config) if known.config else make_config(known.profile)
    except (TypeError, ValueError) as err:
        _fail(prog, str(err))
    if known.profile not in profile_names():
        _fail(prog, f"unknown profile {known.profile!r}; choose one of {profile_names()}")
    defaults = {k: v for k, v in base.project_settings().items() if k != "profile"}
    defaults.update(bnb_arguments(base.bnb))
    defaults.update(non_default_fields(base.lora))
    defaults.update(non_default_fields(base.sft))
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: _as_default(v) for k, v in defaults.items() if k in dests})
    try:
        run, project, lora, bnb, sft, rest = parser.parse_args_into_dataclasses(args=argv,
                                                                                return_remaining_strings=True)
        if rest:
            raise ValueError(f"unrecognized arguments: {' '.join(rest)}{_suggestion(rest[0], dests)}")
        cfg = _apply(base, project, lora, bnb, sft)
    except (TypeError, ValueError) as err:
        _fail(prog, str(err))
    return run, cfg


def _fail(prog: str, message: str):
    """Exit 2 with one line (argparse's own error would print the usage of some 250 flags first)."""
    import sys

    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def _suggestion(flag: str, dests: set[str]) -> str:
    import difflib

    near = difflib.get_close_matches(flag.lstrip("-").split("=")[0].replace("-", "_"), dests, n=3)
    return f" (did you mean {', '.join('--' + n for n in near)}?)" if near else ""


def _as_default(value):
    return ",".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value


def _apply(base: FinetuneConfig, project, lora, bnb, sft) -> FinetuneConfig:
    """`base` with the parsed values: the SFTConfig as parsed, LoRA and bitsandbytes fields where they differ."""
    changes = {}
    for f in dataclasses.fields(lora):
        value = getattr(lora, f.name)
        if jsonable(value) != _as_default(jsonable(getattr(base.lora, f.name))):
            if f.name == "target_modules" and isinstance(value, str) and value != "all-linear":
                value = [m.strip() for m in value.split(",") if m.strip()]  # peft reads a plain string as a regex
            changes[f.name] = value
    changes.update({f.name: getattr(bnb, f.name) for f in dataclasses.fields(bnb)
                    if getattr(bnb, f.name) != jsonable(getattr(base.bnb, f.name, None))})
    return base.replace(**vars(project), **changes, sft=sft)
