"""The one settings schema, presets, config files and their migrations."""

from .fields import Section, SectionList, Setting
from .files import read_config_file, write_config_file
from .presets import (
    LoadedPreset,
    PresetInfo,
    list_presets,
    load_preset,
    load_preset_overlay,
    open_preset,
    save_user_preset,
    user_preset_path,
)
from .schema import SCHEMA
from .settings import (
    applies,
    applies_key,
    consistency_problems,
    defaults,
    get_value,
    iter_settings,
    lookup,
    merge,
    parse_set_arguments,
    resolve,
    set_value,
    sparse,
    validate_overlay,
)

__all__ = [
    "SCHEMA",
    "LoadedPreset",
    "applies_key",
    "consistency_problems",
    "open_preset",
    "user_preset_path",
    "PresetInfo",
    "Section",
    "SectionList",
    "Setting",
    "applies",
    "defaults",
    "get_value",
    "iter_settings",
    "list_presets",
    "load_preset",
    "load_preset_overlay",
    "lookup",
    "merge",
    "parse_set_arguments",
    "read_config_file",
    "resolve",
    "save_user_preset",
    "set_value",
    "sparse",
    "validate_overlay",
    "write_config_file",
]
