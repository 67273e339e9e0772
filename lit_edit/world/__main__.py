"""``python -m lit_edit.world [preset]``: build (or find) a world and print its directory and report."""
import sys

from lit_edit.world import ensure_world

p = ensure_world(sys.argv[1] if len(sys.argv) > 1 else "default")
print(p)
print((p / "report.json").read_text())
