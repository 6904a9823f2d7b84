"""Profiles: configs/full.yaml is the recipe (the library configs of LLM.ipynb's section 2); the other files list only
what they change. `make_config` builds a `FinetuneConfig` from the notebook's own objects, or from the files.

    profile = load_profile("smoke")
    lora_config = profile.apply(LoraConfig(r=16, ...))      # the notebook: its objects, the profile's changes shown
    cfg = make_config("smoke", bnb=bnb_config, lora=lora_config, sft=sft_config, math_samples=2000)
    cfg = make_config("smoke", learning_rate=1e-3, r=8)     # tests, the CLI: the recipe from configs/, any field
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llmhelpers.config.library import (LIBRARY_CLASS_NAMES, LIBRARY_CONFIGS, SECRET_FIELDS, STEP_INTERVALS,
                                       bnb_constructor_arguments, build_bnb, changed_bnb, jsonable,
                                       keep_accelerator_state, library_owner)
from llmhelpers.config.project import PROJECT_FIELDS, FinetuneConfig
from llmhelpers.paths import REPO_ROOT

CONFIGS_DIR = REPO_ROOT / "configs"
RECIPE = "full"  # the profile whose file holds the whole recipe; the others change it


def profile_names() -> list[str]:
    """The profiles in configs/; a file that does not parse is left out here (reading that profile says why)."""
    names = []
    for path in CONFIGS_DIR.glob("*.yaml"):
        try:
            if _read(path.stem) is not None:
                names.append(path.stem)
        except ValueError:
            continue
    return sorted(names)


def _read(name: str) -> dict | None:
    import yaml

    path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # only this profile fails, naming the file and line
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"profile {name!r}: {path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict) or not set(data) <= {"project", *LIBRARY_CONFIGS}:
        return None  # not a profile (e.g. an accelerate config)
    return data


@dataclass
class Profile:
    """What a profile changes: project settings, and arguments of each library config."""
    name: str
    project: dict = field(default_factory=dict)
    bnb: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # by apply: values written in a cell that the profile left alone

    def apply(self, config):
        """`config` with this profile's changes (a new object; the same one when there are none). A change is made
        only where `config` still holds the recipe's value (configs/full.yaml's, or the library default it leaves
        as is): a value you wrote yourself in the cell is kept, and `kept` says which."""
        key = _library_key(config)
        written = recipe(RECIPE)[key]
        changes, self.kept[key] = {}, {}
        for name, value in getattr(self, key).items():
            current = jsonable(getattr(config, name, None))
            if current == jsonable(written[name] if name in written else _library_default(key, name)):
                changes[name] = value
            else:
                self.kept[key][name] = current
        if not changes:
            return config
        if key == "bnb":
            return changed_bnb(config, **changes)
        with keep_accelerator_state():
            return dataclasses.replace(config, **changes)

    def __str__(self) -> str:
        parts = [f"{LIBRARY_CLASS_NAMES.get(key, 'project settings')}: " + ", ".join(f"{k}={v!r}" for k, v in getattr(self, key).items())
                 for key in ("project", *LIBRARY_CONFIGS) if getattr(self, key)]
        kept = [f"{k}={v!r}" for changes in self.kept.values() for k, v in changes.items()]
        text = f"profile {self.name}: " + ("\n  ".join(["changes the recipe:", *parts]) if parts else
                                           "the recipe as written")
        return text + (f"\n  kept as written in the cells: {', '.join(kept)}" if kept else "")


def load_profile(name: str) -> Profile:
    if name == RECIPE:
        return Profile(RECIPE)
    data = _read(name)
    if data is None:
        raise ValueError(f"unknown profile {name!r}; choose one of {profile_names()} (files in {CONFIGS_DIR})")
    return Profile(name, **{k: dict(v or {}) for k, v in data.items()})


def recipe(name: str = RECIPE) -> dict:
    """{"bnb": kwargs, "lora": kwargs, "sft": kwargs} of configs/full.yaml with profile `name`'s changes."""
    base = _read(RECIPE)
    changes = load_profile(name)
    return {key: {**(base.get(key) or {}), **getattr(changes, key)} for key in LIBRARY_CONFIGS}


def library_configs(name: str = RECIPE, **changes) -> dict:
    """The three library objects of profile `name`'s recipe, with `changes` routed to the config that has them."""
    kwargs = recipe(name)
    for key, value in changes.items():
        kwargs[library_owner(key, PROJECT_FIELDS)][key] = value
    sft = kwargs["sft"]
    for key in STEP_INTERVALS:  # SFTConfig turns eval_steps=0 into logging_steps silently: refused before it can
        if isinstance(sft.get(key), (int, float)) and not sft[key] > 0:
            raise ValueError(f"{key}={sft[key]!r} is invalid: must be > 0 (SFTConfig)")
    if "use_cpu" not in sft:  # the notebook's cell says use_cpu=not torch.cuda.is_available()
        import torch

        sft["use_cpu"] = not torch.cuda.is_available()  # also makes several CPU processes (gloo) form one DDP group
    from peft import LoraConfig
    from trl import SFTConfig

    with keep_accelerator_state():
        return {"bnb": build_bnb(kwargs["bnb"]), "lora": LoraConfig(**kwargs["lora"]),
                "sft": SFTConfig(**sft)}


def make_config(profile: str = RECIPE, /, bnb=None, lora=None, sft=None, **overrides) -> FinetuneConfig:
    """The run's config. With the notebook's library objects (all three), they are used as they are and `overrides`
    may set only project settings; without them, the recipe comes from configs/ and `overrides` may set any field of
    the project or of the three library configs (by the library's name for it)."""
    prof = load_profile(profile)
    given = {"bnb": bnb, "lora": lora, "sft": sft}
    project = {k: v for k, v in overrides.items() if k in PROJECT_FIELDS}
    library = {k: v for k, v in overrides.items() if k not in PROJECT_FIELDS}
    if project.get("profile", profile) != profile:
        raise ValueError(f"profile={project['profile']!r} in the overrides contradicts make_config({profile!r})")
    if any(v is not None for v in given.values()):
        if any(v is None for v in given.values()):
            raise ValueError("give all three library configs (bnb, lora, sft) or none")
        if library:
            key = next(iter(library))
            owner = library_owner(key, PROJECT_FIELDS)
            raise ValueError(f"{key} is a {LIBRARY_CLASS_NAMES[owner]} setting: set it where {owner}'s config is "
                             f"built (the notebook's recipe cells), not among the project settings")
        objects = given
    else:
        objects = library_configs(profile, **library)
    return FinetuneConfig(**{**prof.project, **project, "profile": profile, **objects})


def _library_default(key: str, name: str):
    import inspect

    if key == "bnb":
        from transformers import BitsAndBytesConfig

        return inspect.signature(BitsAndBytesConfig.__init__).parameters[name].default
    from peft import LoraConfig
    from trl import SFTConfig

    f = {f.name: f for f in dataclasses.fields(LoraConfig if key == "lora" else SFTConfig)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _library_key(config) -> str:
    for key, name in LIBRARY_CLASS_NAMES.items():
        if type(config).__name__ == name or any(c.__name__ == name for c in type(config).__mro__):
            return key
    raise TypeError(f"not a library config: {type(config).__name__}")


def changed_settings(cfg: FinetuneConfig) -> dict:
    """The settings of `cfg` that differ from its profile's recipe, each under its own name."""
    mine, recipe_ = flat_settings(cfg), flat_settings(make_config(cfg.profile))
    return {k: v for k, v in mine.items() if recipe_.get(k) != v and k not in ("profile", "use_cpu")}


def flat_settings(cfg: FinetuneConfig) -> dict:
    """Every setting by its own name (project and library fields; the names do not overlap), as JSON values."""
    out = dict(cfg.project_settings())
    out.update(bnb_constructor_arguments(cfg.bnb))
    for key in ("lora", "sft"):
        obj = getattr(cfg, key)
        out.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                    if f.init and f.name not in SECRET_FIELDS})
    return {k: jsonable(v) for k, v in out.items()}
