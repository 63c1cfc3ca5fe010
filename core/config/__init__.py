"""The one settings schema, presets, config files and their migrations."""

from .fields import Section, SectionList, Setting
from .files import read_config_file, write_config_file
from .presets import PresetInfo, list_presets, load_preset, load_preset_overlay, save_user_preset
from .schema import SCHEMA
from .settings import (
    applies,
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
