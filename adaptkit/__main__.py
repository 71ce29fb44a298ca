"""``python -m adaptkit``: the same command line as the ``adaptkit`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
