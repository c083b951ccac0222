"""``python -m recipes``: list every cell module and the profiles that train it."""
from recipes import all_cells
from recipes.protocols import PROFILES

for module, cell in sorted(all_cells().items()):
    print(f"python -m recipes.{module:40s} profiles: {', '.join(p.name for p in PROFILES.values() if cell in p.cells)}")
