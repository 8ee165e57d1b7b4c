"""train.py's command line: the parser generated from `train.Config`, the recipes, and the checks of every option.

For Rubric Policy Optimization (arXiv 2605.08354, §3.3). Standard library only: `python train.py --help` and a
mistyped option are answered before torch and diffusers load (about a second instead of ten).

    cfg = make_config(Config, recipes, argv)    # what the user set > --config FILE > the demo > the recipe > default
                                                # (--resume: what the user set, where safe > the saved config)

- Every Config field is declared with `paper(...)` (the paper's recipe: the paper or the official code sets it) or
  `beyond(...)` (beyond the paper, and scale), with its help text and where its value comes from; `--help` shows the
  two blocks as two groups, with the choices and the recipe's value per model type.
- Booleans are `--flag` / `--no_flag`. No prefix matching (`--judge_ur` is an error, not `--judge_url`), and an
  unknown option is answered in one line with the closest known one.
- `--config FILE`: a TOML file of `option = value` lines (the standard library's tomllib); an unknown key is an
  error naming the key and the file. A table (`[reward]` then `rank = 1.0` lines) gives a text option its
  `name:value,name:value` form.

Run: nothing to run; `python -m pytest tests/test_cli.py` covers it.

Deliberate deviations from the official code
    1. The official trainers take their settings from shell scripts of accelerate flags; here one dataclass is the
       whole configuration, printed and saved with every run.
"""
import argparse
import dataclasses
import difflib
import importlib.util
import sys
import tomllib
import typing
from dataclasses import field
from pathlib import Path

PAPER = "the paper's recipe (arXiv 2605.08354 §3.3, Table 3 and the official code's settings)"
BEYOND = "beyond the paper, and scale"


class ConfigError(Exception):
    """Bad configuration or input, found before any model is loaded (exit code 2)."""


def paper(default, help, source, choices=None, valid=None):
    """A Config field of the paper's recipe; `source` says who sets it (e.g. "paper §3.3", "official code").
    choices: the values allowed; valid: a `Valid` range (checked unless the value is None)."""
    return field(default=default, metadata={"help": help, "source": source, "block": PAPER, "choices": choices,
                                            "valid": valid})


def beyond(default, help, source, choices=None, valid=None):
    """A Config field beyond the paper (options, scale, plumbing); `source` names the peer it follows, or "ours"."""
    return field(default=default, metadata={"help": help, "source": source, "block": BEYOND, "choices": choices,
                                            "valid": valid})


@dataclasses.dataclass(frozen=True)
class Valid:
    """A range check of one option: `ok(value)`, and `text` for the error ("must be >= 2")."""
    ok: typing.Callable
    text: str


def at_least(low):
    return Valid(lambda v: v >= low, f">= {low}")


def above(low):
    return Valid(lambda v: v > low, f"> {low}")


def within(low, high, low_open=False, high_open=False):
    """low <= v <= high, with either end open."""
    return Valid(lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high),
                 f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching, whose errors are a ConfigError of one line with a suggestion instead of
    the whole usage (--help still prints the usage and exits 0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            words = []
            for arg in message.removeprefix("unrecognized arguments: ").split():
                if arg.startswith("--"):
                    name = arg.split("=", 1)[0]
                    close = suggestion(name, known)
                    words.append(f"{name}" + (f" (did you mean {close}?)" if close else ""))
            if words:
                message = "unknown option " + ", ".join(words)
        raise ConfigError(f"{message} (--help lists every option)")


def suggestion(name, known):
    """The known name the user most likely meant: the longest one that `name` begins with (a word run on:
    --lr_rate -> --lr), else the shortest one that begins with `name` (cut off: --judge_ur -> --judge_url), else the
    closest by difflib, else None."""
    ran_on = [k for k in known if name.startswith(k)]
    cut_off = [k for k in known if k.startswith(name)]
    if ran_on or cut_off:
        return max(ran_on, key=len) if ran_on else min(cut_off, key=len)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _kind(hint):
    """The non-None type of a field's annotation (`int | None` -> int)."""
    return next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))


def build_parser(config_cls, recipes, description=None):
    """argparse from the dataclass, one group per block; unset options stay None so the resolution order holds."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage="%(prog)s [--config FILE] [--option value ...] (every option below)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file of option = value lines (recipes/*.toml), between the recipe and the flags")
    groups = {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        block = f.metadata["block"]
        group = groups.setdefault(block, parser.add_argument_group(block))
        kind = _kind(hints[f.name])
        recipe = ", ".join(f"{name} {values[f.name]}" for name, values in recipes.items() if f.name in values)
        where = f"recipe: {recipe}" if recipe else f"default: {f.default}"
        help_text = f"{f.metadata['help']} [{f.metadata['source']}; {where}]"
        allowed = [c for c in f.metadata["choices"] or () if c is not None] or None
        if kind is bool:
            group.add_argument(f"--{f.name}", action="store_true", default=None, help=help_text)
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=f"turn --{f.name} off")
        else:
            group.add_argument(f"--{f.name}", type=kind, default=None, choices=allowed, help=help_text)
    return parser


def read_config_file(path, config_cls):
    """{option: value} of a TOML file; ConfigError naming the file and the key for an unknown key or a wrong type."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not a TOML file ({e})") from None
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    for key, value in list(values.items()):
        if isinstance(value, dict) and key in hints and _kind(hints[key]) is str:
            # a table such as [reward] rank = 1.0: the option's "name:value,name:value" form (train.py --reward)
            values[key] = value = ",".join(f"{name}:{v}" for name, v in value.items())
        if key not in hints:
            close = suggestion(key, names)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f" (did you mean {close!r}?)" if close else ""))
        kind = _kind(hints[key])
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not fits and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} = {value!r} should be a {kind.__name__}")
    return {k: float(v) if _kind(hints[k]) is float else v for k, v in values.items()}


def make_config(config_cls, recipes, argv=None, demos=None, description=None, saved=None, resume_safe=()):
    """argv -> config: what the user set, else the --config file, else the demo's settings (no --model; `demos` is
    (model_type, what the user set) -> overrides or None, called only then), else the recipe of the model type,
    else the default. A resumed run (`saved`: what the user set -> (the saved config, its file) or None) takes the
    saved config instead of the demo, the recipe and the defaults, and what the user set may differ from it only in
    the `resume_safe` fields. Then every field's choices and range. Raises ConfigError naming the option."""
    parser = build_parser(config_cls, recipes, description)
    args = vars(parser.parse_args(argv))
    from_file = read_config_file(args.pop("config"), config_cls) if args.get("config") else {}
    given = {**from_file, **{k: v for k, v in args.items() if v is not None}}
    resumed = saved(given) if saved is not None else None
    if resumed is not None:
        cfg = resumed_config(config_cls, given, *resumed, resume_safe)
    else:
        model_type = given.get("model_type", "flux")
        if model_type not in recipes:
            raise ConfigError(f"--model_type {model_type!r} is unknown; choose one of {sorted(recipes)}")
        demo = demos(model_type, given) if demos is not None and given.get("model") is None else None
        if given.get("model") is None and demos is not None and demo is None:
            raise ConfigError(f"--model_type {model_type} has no built-in demo yet; pass --model")
        cfg = config_cls(**{**recipes[model_type], **(demo or {}), **given})
    for f in dataclasses.fields(config_cls):
        value, allowed, valid = getattr(cfg, f.name), f.metadata["choices"], f.metadata["valid"]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"--{f.name} {value!r}: choose one of {[a for a in allowed if a is not None]}")
        if valid is not None and value is not None and not valid.ok(value):
            raise ConfigError(f"--{f.name} {value} is out of range (must be {valid.text})")
    if getattr(cfg, "log_with", "none") != "none" and importlib.util.find_spec(cfg.log_with) is None:
        raise ConfigError(f"--log_with {cfg.log_with}: the package is not installed (pip install {cfg.log_with})")
    return cfg


def resumed_config(config_cls, given, values, where, resume_safe):
    """The config of a resumed run: the saved `values` (read from the file `where`; a field it lacks takes its
    default, a key no field has is ignored) with what the user set on top, which may differ only in the
    `resume_safe` fields: any other difference is a ConfigError naming each field, its saved and its new value."""
    saved = {f.name: f.default for f in dataclasses.fields(config_cls)}
    saved.update({k: v for k, v in values.items() if k in saved})
    differ = [f"--{k} {saved[k]!r} -> {v!r}" for k, v in given.items() if k not in resume_safe and saved[k] != v]
    if differ:
        raise ConfigError(f"--resume continues the run saved in {where}, which cannot change {', '.join(differ)}; "
                          f"only {', '.join(resume_safe)} may differ (to change the rest, start a new run in "
                          "another --output_dir)")
    return config_cls(**{**saved, **given})


def changed(cfg, config_cls):
    """The fields of `cfg` that differ from the dataclass defaults, as one "name=value" string (the console line)."""
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(config_cls)
                    if getattr(cfg, f.name) != f.default)


def exit_on_bad_command_line(make, argv):
    """`make(argv)` before the heavy imports of a script: --help prints and exits 0, a bad option prints one line
    and exits 2; a good command line returns and the script parses it again in its main()."""
    try:
        make(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
