"""``python -m honelm.cli`` (also what ``accelerate launch -m honelm.cli`` runs)."""

from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
