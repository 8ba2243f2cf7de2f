"""Command-line edge shared by every entry point: absl flags through `absl.app.run` (so `--help`
and `--helpfull` work, as t5x and MaxText users expect), one-line errors for a bad or unknown
flag, and the gin flags (`--gin_file`, `--gin_bindings`, the `--gin.NAME=VALUE` shorthand).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_ROOT = os.path.join(REPO_ROOT, "gin_configs")

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
_GIN_SHORTHAND: list[str] = []  # bindings from --gin.NAME=VALUE, kept aside from absl's flags


def rewrite_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Turns `--gin.NAME=VALUE` into gin bindings; returns (remaining argv, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def gin_files_help() -> str:
  """The gin files shipped with the repo, for --help."""
  files = sorted(os.path.relpath(p, GIN_ROOT) for p in glob.glob(os.path.join(GIN_ROOT, "*", "*.gin")))
  return "Gin files under gin_configs/: " + ", ".join(files) + "."


def define_gin_flags(default_file: str | None = None) -> None:
  from absl import flags

  default = f" Default: {os.path.relpath(default_file, GIN_ROOT)}." if default_file else ""
  flags.DEFINE_multi_string("gin_file", None, "Gin config files; later files override earlier ones."
                            f"{default} {gin_files_help()}")
  flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, applied after the files "
                            "(`--gin.NAME=VALUE` is shorthand for the binding NAME = VALUE).")
  flags.DEFINE_multi_string("gin_search_paths", [REPO_ROOT, GIN_ROOT], "Paths searched for gin files and includes.")


def parse_gin(fl, default_file: str | None = None) -> None:
  """Parses the gin files and bindings given on the command line (after `run` parsed the flags)."""
  import gin

  for p in fl.gin_search_paths:
    gin.add_config_file_search_path(p)
  files = fl.gin_file or ([default_file] if default_file else [])
  gin.parse_config_files_and_bindings(files, list(fl.gin_bindings) + _GIN_SHORTHAND)


def parse_flags(argv: Sequence[str], prog: str) -> list[str]:
  """absl flag parsing with the gin shorthand kept aside, and a bad or unknown flag reported in
  one line (exit status 2) instead of absl's usage dump."""
  from absl import flags

  argv, _GIN_SHORTHAND[:] = rewrite_gin_shorthand(argv)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    print(f"{prog}: {e} (see --help)", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:  # absl's help flags print the usage and exit 1; asked-for help is a success
    if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise


def run(main: Callable[[Sequence[str]], object], prog: str) -> None:
  """`absl.app.run(main)` with `parse_flags`: --help / --helpfull print the flags and exit.
  Library INFO logs (Orbax writes a line per file operation) are off unless --verbosity is given."""
  from absl import app
  from absl import flags
  from absl import logging

  def quiet_main(argv):
    if len(argv) > 1:  # every oxyjax command takes flags only
      raise SystemExit(f"{prog}: unexpected arguments {argv[1:]} (see --help)")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)

  # --help lists the main module's key flags: make the flags every oxyjax module defined
  # (the gin flags here, the command's own) key flags of the program being run.
  main_module = sys.argv[0]
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module != main_module and (module.startswith("oxyjax") or f"{os.sep}oxyjax{os.sep}" in module):
      for f in module_flags:
        flags.FLAGS.register_key_flag_for_module(main_module, f)
  app.run(quiet_main, flags_parser=lambda argv: parse_flags(argv, prog))


def require_dir(prog: str, flag: str, path: str | None, what: str) -> str:
  """A required directory flag: exits with one line naming the flag when it is empty or not a directory."""
  if not path:
    raise SystemExit(f"{prog}: --{flag} is required ({what})")
  if not os.path.isdir(path):
    raise SystemExit(f"{prog}: --{flag}={path}: no such directory ({what})")
  return path


def run_gin_entry(fn: Callable[..., object], default_file: str, prog: str) -> None:
  """An entry point whose flags are gin files and bindings: `python -m <module>` calls `fn` with its
  gin-bound arguments, after the multi-host runtime is up (no-op for one process)."""

  def main(argv: Sequence[str]):
    import gin
    from absl import flags

    from oxyjax import distributed

    # Multi-host runtime first, before anything touches a JAX device.
    distributed.initialize()
    parse_gin(flags.FLAGS, default_file=default_file)
    print("[oxyjax] gin config:\n" + gin.config_str(), flush=True)
    gin.get_configurable(fn)()

  define_gin_flags(default_file)
  run(main, prog)
