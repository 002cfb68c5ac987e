"""python -m utils.config --write-defaults: regenerate configs/default_config.yaml from the schema."""
from __future__ import annotations

import argparse

from utils.config import DEFAULT_CONFIG
from utils.config.defaults_file import write_default_config

parser = argparse.ArgumentParser(prog="python -m utils.config", description=__doc__)
parser.add_argument("--write-defaults", action="store_true", required=True,
                    help=f"write {DEFAULT_CONFIG} from utils/config/schema.py")
parser.parse_args()
write_default_config(DEFAULT_CONFIG)
print(f"wrote {DEFAULT_CONFIG}")
