"""``python -m recipes``: list every cell module, the profiles that train it, and whether the report's tables
hold it; ``--profile P``: that profile's cells only, then its protocol notes (where each choice comes from:
the report, the report's code, or this project; recipes/protocols.py NOTES)."""
import argparse
import sys

from fastrobust.cli import exit_quietly_on_broken_pipe
from recipes import all_cells
from recipes.protocols import NOTES, PROFILES, cell_in_report, notes_markdown


def listing() -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="list this profile's cells and notes")
    ns = parser.parse_args()
    for module, cell in sorted(all_cells().items()):
        having = [p.name for p in PROFILES.values() if cell in p.cells]
        if ns.profile and ns.profile not in having:
            continue
        mark = "" if cell_in_report(*cell) else "[addition: not in the report's tables]"
        print(f"python -m recipes.{module:40s} {mark:39s} profiles: {', '.join(having)}")
    if ns.profile:
        print()
        if ns.profile in NOTES:
            print(f"Protocol notes of the {ns.profile} profile (each run's manifest.json records those of its cell):\n")
            print(notes_markdown(ns.profile))
        else:
            print(f"The {ns.profile} profile is not the report's protocol; recipes/protocols.py describes it.")
    return 0


# piped into head, the listing stops quietly (status 141)
sys.exit(exit_quietly_on_broken_pipe(listing))
