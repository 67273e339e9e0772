"""Sequential knowledge editing as a Lightning fit loop: ``python train.py fit --config configs/world/alphaedit.yaml``."""
from lit_edit.cli import main

if __name__ == "__main__":
    main()
