"""``python -m lorafit`` (what ``accelerate launch -m lorafit train ...`` runs)."""

from lorafit.cli import main

if __name__ == "__main__":
    main()
